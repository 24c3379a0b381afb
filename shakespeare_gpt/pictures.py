"""Pictures of what a model has learned: attention maps, and the names of characters for the embedding projector.

Drawn with Pillow (which TensorBoard's Images tab needs anyway), for TensorBoard and for PNG files; the
callbacks in ``callbacks.py`` decide when.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

DRAWN = {"\n": "\\n", " ": "·", "\t": "\\t"}  # an invisible character on an axis
NAMED = {"\n": "newline", " ": "space", "\t": "tab", "\r": "carriage return"}  # ... in the projector's list


def axis_label(token: str) -> str:
    return "".join(DRAWN.get(c, c if c.isprintable() else "?") for c in token)


def char_name(c: str) -> str:
    """A character spelt out where it is invisible: ``newline``, ``space``, ``U+00A0``."""
    return NAMED.get(c) or (c if c.isprintable() and not c.isspace() else f"U+{ord(c):04X}")


def char_kind(c: str) -> str:
    """What a learner colours the projector's points by: vowel, capital consonant, punctuation, ..."""
    if c.isspace():
        return "whitespace"
    if c.isalpha():
        return ("capital " if c.isupper() else "") + ("vowel" if c.lower() in "aeiou" else "consonant")
    return "digit" if c.isdigit() else "punctuation"


def attention_image(maps: torch.Tensor, labels: list[str], title: str, first_layer: int = 0) -> Image.Image:
    """(L, n_head, T, T) attention weights as one picture: ``title`` on top, then a row per layer, its heads
    side by side, each captioned with its layer and head.

    Each head is a query (row) by key (column) matrix, white at weight 0 and darker up to 1 (on a square
    root scale, so that small weights show): the keys after a query, which it cannot see, are the white
    triangle above the diagonal. ``labels``, one per position, name the rows and columns where a cell is
    big enough to hold them.
    """
    L, H, T, _ = maps.shape
    cell = max(1, min(12, 512 // T))  # pixels per weight: a 64-character prompt in 512 pixels
    labelled = cell >= 8
    font = ImageFont.load_default(size=max(cell, 10))
    margin = 2 * cell if labelled else 0  # room for a label of up to two glyphs ("\n")
    tall = margin + T * cell + 16
    wide = max(tall, round(font.getlength(f"layer {first_layer + L - 1} · head {H - 1}")) + 16)
    image = Image.new("RGB", (max(H * wide, round(font.getlength(title)) + 4), 16 + L * (tall + 14)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((0, 0), title, fill="black", font=font)
    w = maps.detach().float().clamp(0, 1).sqrt().cpu()
    pixels = torch.stack([255 - 215 * w, 255 - 170 * w, 255 - 75 * w], dim=-1).round().byte().numpy()  # to navy
    for layer in range(L):
        for head in range(H):
            x, y = head * wide, 16 + layer * (tall + 14)
            draw.text((x, y), f"layer {first_layer + layer} · head {head}", fill="black", font=font)
            x, y = x + margin, y + 14 + margin
            tile = Image.fromarray(pixels[layer, head]).resize((T * cell, T * cell), Image.Resampling.NEAREST)
            image.paste(tile, (x, y))
            draw.rectangle((x - 1, y - 1, x + T * cell, y + T * cell), outline="grey")
            for i, label in enumerate(labels if labelled else []):
                middle = i * cell + cell // 2
                draw.text((x + middle, y - 1), label, fill="black", font=font, anchor="ms")  # keys, above
                draw.text((x - 2, y + middle), label, fill="black", font=font, anchor="rm")  # queries, left
    return image
