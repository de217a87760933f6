"""The thumbnail ComfyUI's template browser shows for each shipped workflow.

The frontend lists a custom node pack's templates by file name and asks for
``/api/workflow_templates/<pack>/<name>.jpg`` for each card (the extension is fixed to
``jpg`` for packs); ComfyUI 0.3.64 serves the pack's workflows folder as static files
under that path, so the file is ``<name>.jpg`` beside ``<name>.json``. Without it the
card is blank and the request a 404.

A thumbnail is drawn from what the template itself uses, so it shows what the workflow
works on without claiming a result: its input photo (cropped around the edit), the edit
mask outlined when the template loads one, the SAM points it prompts with (green: on
the object, red: off it), and a band with the note's title and the layout's
``caption``. Small (384 px, JPEG) so the browser loads eight at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from . import engine

SIZE = 384
QUALITY = 82
MAX_BYTES = 60_000
OUTLINE = (255, 214, 0)          # the mask's outline: yellow, seen on red and on grey
POSITIVE, NEGATIVE = (40, 220, 90), (235, 50, 50)
BAND = (22, 24, 30)              # the caption band below the photo
PHOTO_H = 288                    # the photo's height; the band takes the rest
FONT_FILES = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf")
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu",
             "/Library/Fonts", "C:/Windows/Fonts")


def _font(size: int, bold: bool = True):
    from PIL import ImageFont

    name = FONT_FILES[0] if bold else FONT_FILES[1]
    for d in FONT_DIRS:
        path = Path(d) / name
        if path.exists():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def _inputs(prompt: Mapping[str, dict], class_type: str, name: str) -> list:
    return [n["inputs"][name] for n in prompt.values()
            if n.get("class_type") == class_type and isinstance(n["inputs"].get(name), str)]


def _window(size: tuple[int, int], focus: tuple[float, float] | None,
            aspect: float) -> tuple[int, int, int, int]:
    """The largest box of ``aspect`` (w/h) inside an image of ``size``, centred on
    ``focus`` (pixels; the centre when None) as far as the edges allow."""
    w, h = size
    cw, ch = (w, w / aspect) if w / h <= aspect else (h * aspect, h)
    fx, fy = focus if focus is not None else (w / 2, h / 2)
    x = min(max(fx - cw / 2, 0), w - cw)
    y = min(max(fy - ch / 2, 0), h - ch)
    return round(x), round(y), round(x + cw), round(y + ch)


def _title(note: str) -> str:
    for line in note.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def _largest_font(draw, text: str, width: int, size: int, smallest: int, bold: bool):
    """The font, from ``size`` down to ``smallest`` px, in which ``text`` fits ``width``."""
    font = _font(size, bold)
    while size > smallest and draw.textlength(text, font=font) > width:
        size -= 1
        font = _font(size, bold)
    return font


def _fit_text(draw, text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def render(prompt: Mapping[str, dict], note: str, caption: str, inputs_dir: Path):
    """The thumbnail (an RGB PIL image) of a workflow: its API ``prompt``, the layout's
    ``note`` (its first heading is the title) and ``caption``, and the folder of the
    photos it loads. The photo fills the top, cropped around the mask (or the SAM
    points); the title and caption sit in a band below it."""
    from PIL import Image, ImageChops, ImageDraw, ImageFilter

    from ..mgie_core.models.sam import parse_points

    photos = _inputs(prompt, "LoadImage", "image")
    if photos and (inputs_dir / photos[0]).is_file():
        with Image.open(inputs_dir / photos[0]) as im:
            photo = im.convert("RGB")
    else:
        photo = Image.new("RGB", (SIZE, SIZE), (60, 64, 72))
    mask = None
    masks = _inputs(prompt, "LoadImageMask", "image")
    if masks and (inputs_dir / masks[0]).is_file():
        with Image.open(inputs_dir / masks[0]) as m:
            mask = m.convert("L").resize(photo.size).point(lambda v: 255 if v > 127 else 0)
    points = [(xy, colour)
              for name, colour in (("points", POSITIVE), ("negative_points", NEGATIVE))
              for text in _inputs(prompt, "XMGIESAMSegment", name)
              for xy in parse_points(text, name, size=photo.size)]

    # The photo's window: around the mask, else the SAM points, else the centre.
    focus = None
    if mask is not None and mask.getbbox():
        x0, y0, x1, y1 = mask.getbbox()
        focus = ((x0 + x1) / 2, (y0 + y1) / 2)
    elif points:
        focus = (sum(p[0][0] for p in points) / len(points),
                 sum(p[0][1] for p in points) / len(points))
    box = _window(photo.size, focus, SIZE / PHOTO_H)
    scale = SIZE / (box[2] - box[0])
    img = Image.new("RGB", (SIZE, SIZE), BAND)
    view = photo.crop(box).resize((SIZE, PHOTO_H), Image.LANCZOS)
    if mask is not None:
        # Outside the mask a little darker, and a 3 px outline around it.
        m = mask.crop(box).resize((SIZE, PHOTO_H)).point(lambda v: 255 if v > 127 else 0)
        view = Image.composite(view, Image.eval(view, lambda v: int(v * 0.55)), m)
        ring = ImageChops.subtract(m.filter(ImageFilter.MaxFilter(7)), m)
        view.paste(OUTLINE, (0, 0), ring)
    img.paste(view, (0, 0))

    draw = ImageDraw.Draw(img)
    for (x, y), colour in points:
        cx, cy, r = (x - box[0]) * scale, (y - box[1]) * scale, 9
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(255, 255, 255),
                     width=3)

    title, width = _title(note), SIZE - 28
    title_font = _largest_font(draw, title, width, 21, 16, bold=True)
    caption_font = _largest_font(draw, caption, width, 16, 13, bold=False)
    draw.text((14, PHOTO_H + 16), _fit_text(draw, title, title_font, width),
              font=title_font, fill=(255, 255, 255))
    draw.text((14, PHOTO_H + 52), _fit_text(draw, caption, caption_font, width),
              font=caption_font, fill=(205, 210, 220))
    tag_font = _font(14)
    tag = "xMGIE"
    tw = draw.textlength(tag, font=tag_font)
    draw.rounded_rectangle((10, 10, 26 + tw, 34), radius=6, fill=BAND)
    draw.text((18, 13), tag, font=tag_font, fill=OUTLINE)
    return img


def write(path: Path, image) -> None:
    """Save as JPEG under MAX_BYTES (lowering the quality if a photo is very busy)."""
    quality = QUALITY
    while True:
        image.save(path, "JPEG", quality=quality, optimize=True, progressive=True)
        if path.stat().st_size <= MAX_BYTES or quality <= 40:
            return
        quality -= 8


def layout_caption(layout_path: Path) -> str:
    data = json.loads(Path(layout_path).read_text(encoding="utf-8"))
    caption = data.get("caption", "")
    return caption if isinstance(caption, str) else ""


def thumbnail_for(api_path: Path, layout_path: Path, note: str,
                  inputs_dir: Path | None = None):
    """The thumbnail of a shipped workflow from its two source files."""
    prompt = engine.load_file(api_path)
    folder = Path(api_path).parent.parent
    return render(prompt, note, layout_caption(layout_path), inputs_dir or folder / "inputs")
