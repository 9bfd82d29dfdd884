"""The caption head of FLIP's COCO caption fine-tuning, as the paper puts it on CausalFusion's body (App. C, Table 13):
a 3-layer transformer encoder over the body's image tokens and a 3-layer transformer decoder (width 384, 6 heads)
that reads them by cross-attention and predicts the caption's next token under a causal mask.

    head = CaptionHead(in_dim=1024, num_tokens=256, vocab_size=128256, text_len=35)
    logits = head(image_tokens, text[:, :-1])          # (N, L, D) body tokens, (N, T) ids from BOS -> (N, T, V)
    ids = head.generate(image_tokens, bos, eos)        # greedy, token by token: (N, <= text_len) from BOS

Pre-LN layers (torch's TransformerEncoderLayer / TransformerDecoderLayer with norm_first, GELU, MLP 4x), learned
position embeddings for the image tokens and the text, dropout on the embeddings, attention and MLPs. The body's
tokens are LayerNorm-ed and projected to the head's width first (the body's residual stream is not normalized).
Greedy decoding runs the decoder over the growing prefix (no KV cache): the causal mask makes the logits of each
step those of one full forward over the decoded sequence (test_finetune.py checks it).
"""
import torch
import torch.nn as nn


class CaptionHead(nn.Module):
    def __init__(self, in_dim, num_tokens, vocab_size, text_len, width=384, num_heads=6, encoder_layers=3,
                 decoder_layers=3, dropout=0.1, mlp_ratio=4.0):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"the caption head's width {width} is not divisible by its {num_heads} heads")
        self.text_len = text_len
        self.in_norm = nn.LayerNorm(in_dim)
        self.in_proj = nn.Linear(in_dim, width)
        self.image_pos = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.embed = nn.Embedding(vocab_size, width)
        self.text_pos = nn.Parameter(torch.zeros(1, text_len, width))
        self.drop = nn.Dropout(dropout)
        hidden = int(width * mlp_ratio)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, num_heads, hidden, dropout, "gelu", batch_first=True, norm_first=True),
            encoder_layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(width, num_heads, hidden, dropout, "gelu", batch_first=True, norm_first=True),
            decoder_layers, norm=nn.LayerNorm(width))
        self.out = nn.Linear(width, vocab_size)
        # torch clones one layer into all of them: draw every matrix afresh (as nn.Transformer does), small embeddings
        for name, p in self.named_parameters():
            if p.ndim > 1 and name not in ("image_pos", "text_pos", "embed.weight"):
                nn.init.xavier_uniform_(p)
        for p in (self.image_pos, self.text_pos, self.embed.weight):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def encode(self, image_tokens):
        """Body tokens (N, L, in_dim) -> the encoder's memory (N, L, width)."""
        x = self.in_proj(self.in_norm(image_tokens)) + self.image_pos  # (N, L, W)
        return self.encoder(self.drop(x))

    def decode(self, text, memory):
        """Token ids (N, T) from BOS, T <= text_len, and the memory (N, L, W) -> next-token logits (N, T, V); position
        i sees the ids 0..i only."""
        t = text.shape[1]
        if t > self.text_len:
            raise ValueError(f"{t} text tokens, but the caption head has {self.text_len} text positions")
        x = self.drop(self.embed(text) + self.text_pos[:, :t])  # (N, T, W)
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=text.device, dtype=x.dtype)  # (T, T)
        return self.out(self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True))  # (N, T, V)

    def forward(self, image_tokens, text):
        return self.decode(text, self.encode(image_tokens))

    @torch.no_grad()
    def generate(self, image_tokens, bos, eos, max_len=None, return_logits=False):
        """Greedy captions of body tokens (N, L, D): ids (N, T) starting with BOS, one token a step until every row
        has given EOS or T = max_len (default text_len); a finished row is padded with EOS. return_logits: also the
        logits (N, T - 1, V) each step chose from."""
        max_len = max_len or self.text_len
        memory = self.encode(image_tokens)
        n = memory.shape[0]
        ids = torch.full((n, 1), bos, dtype=torch.long, device=memory.device)  # (N, 1)
        done = torch.zeros(n, dtype=torch.bool, device=memory.device)
        steps = []
        for _ in range(max_len - 1):
            logits = self.decode(ids, memory)[:, -1].float()  # (N, V): the last position's prediction
            steps.append(logits)
            nxt = logits.argmax(1, keepdim=True).masked_fill(done[:, None], eos)  # (N, 1)
            ids = torch.cat([ids, nxt], 1)
            done |= nxt[:, 0] == eos
            if done.all():
                break
        return (ids, torch.stack(steps, 1)) if return_logits else ids
