"""Image files in and out: the extensions read, ADM's centre crop (extraction, editing and captioning crop alike),
and the PNG grids of samples and captions."""
import textwrap
import zipfile

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GRID_PIXELS = 64  # grids show small images (the demos' 12 and 16 px) zoomed to about this size
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I")  # PIL's modes of a 16-bit greyscale PNG (I: older Pillow)


def center_crop(img, size):
    """ADM's centre crop: halve with BOX while the short side >= 2 * size, resize the short side to size
    with BICUBIC, crop the centre."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_8bit(img):
    """A 16-bit greyscale image as L, by its high byte (as PIL reads 16-bit RGB); other modes as they are.
    convert() would clip its values to 255: a dark 16-bit image would turn white."""
    if img.mode not in SIXTEEN_BIT_GREY:
        return img
    return Image.fromarray((np.asarray(img).clip(0, 2 ** 16 - 1) >> 8).astype(np.uint8))


def read_image(path, option):
    """An image file as RGB; one that cannot be read is a ValueError naming the option and the file."""
    try:
        with Image.open(path) as img:
            return to_8bit(img).convert("RGB")  # decodes: a truncated file raises here
    except FileNotFoundError:
        raise FileNotFoundError(f"{option} {path}: no such file") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for files it cannot decode
        raise ValueError(f"{option} {path}: not a readable image ({e})") from None


def read_npz_images(path, option):
    """arr_0 of an .npz of images (sample.py --out, ADM's batches): uint8 (N, H, W, 3); a file that is not one is a
    ValueError naming the option and the file."""
    try:
        with np.load(path) as f:
            if "arr_0" not in f.files:
                raise ValueError(f"{option} {path}: no arr_0 (keys: {f.files})")
            images = f["arr_0"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{option} {path}: no such file") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{option} {path}: not a readable .npz ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"{option} {path}: arr_0 must be uint8 (N, H, W, 3) images, got {images.dtype} "
                         f"{images.shape}")
    return images


def save_grid(images, path, ncol, pad=2, captions=None, zoom_to=0):
    """uint8 images (N, H, W, 3) -> one PNG, ncol per row, white padding; zoom_to: small images shown larger by an
    integer factor, to about that many pixels (train.py's and sample.py's grids: 64); with captions (N strings),
    each image is shown at least 128 px wide with its caption under it (wrapped, at most 3 lines)."""
    if zoom_to:
        zoom = max(1, zoom_to // images.shape[1])
        images = images.repeat(zoom, 1).repeat(zoom, 2)
    if captions is not None:
        zoom = max(1, -(-128 // images.shape[2]))
        images = images.repeat(zoom, 1).repeat(zoom, 2)
    n, h, w, _ = images.shape
    font = ImageFont.load_default()
    line = font.getbbox("Ag")[3] + 2
    lines = [textwrap.wrap(c, max(1, int(w / font.getlength("x")) - 1))[:3] for c in captions] if captions else []
    text_h = line * max(map(len, lines), default=0)
    nrow, cell = -(-n // ncol), h + text_h + pad
    grid = Image.new("RGB", (ncol * (w + pad) + pad, nrow * cell + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        x, y = pad + c * (w + pad), pad + r * cell
        grid.paste(Image.fromarray(image), (x, y))
        for j, text in enumerate(lines[i] if lines else []):
            draw.text((x, y + h + j * line), text, fill="black", font=font)
    grid.save(path)
