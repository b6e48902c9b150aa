"""Image tiling (`model.vision.tiling`): a global view plus a grid of tiles, as VisualRWKV v7.00 does.

Grids (width x height, at image_size 448; scaled by image_size/448 otherwise):
448x896, 896x448, 896x896, 448x1344, 1344x448, i.e. (cols, rows) in tiles of image_size:
(1,2), (2,1), (2,2), (1,3), (3,1). The original picks the grid with the least wasted area
(the grid's area minus the area of the image scaled, aspect kept and sides floored, to fit
in it; the first of equals wins) and does not tile when that grid is 896x896 and the image
has at most 896*896 pixels. Tiles are cropped row-major from the original pixels
(width // cols by height // rows each); the image processor then resizes every view.

What the data side does with it: a source image becomes `views = tile_image(img, size)`
(global view first, then the tiles), and each view is one image to the model. The human
turn carries one `<image>` marker per view (len(views) markers where the source image had
one, joined by `\\n` like any other images), each marker becomes tokens_per_image
placeholders, the sample's image count is len(views), and the processor output of the
views is stacked per tower key in that order. A sample thus costs
len(views) * tokens_per_image tokens of ctx_len per source image (up to 4x more).
"""

from __future__ import annotations

from PIL import Image

GRIDS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))
"""(cols, rows) in tiles of image_size, in the original's order (it breaks ties by order)."""


def choose_grid(width: int, height: int, image_size: int = 448) -> tuple[int, int]:
    """The (cols, rows) grid that wastes the least area for a width x height image."""
    best, least = GRIDS[0], float("inf")
    for cols, rows in GRIDS:
        gw, gh = cols * image_size, rows * image_size
        scale = min(gw / width, gh / height)
        wasted = abs(gw * gh - int(width * scale) * int(height * scale))
        if wasted < least:
            best, least = (cols, rows), wasted
    return best


def tile_image(image: Image.Image, image_size: int) -> list[Image.Image]:
    """[global image, tiles row-major...]; just [image] when the original would not tile it."""
    image = image.convert("RGB")
    width, height = image.size
    cols, rows = choose_grid(width, height, image_size)
    if (cols, rows) == (2, 2) and width * height <= (2 * image_size) ** 2:
        return [image]
    tw, th = width // cols, height // rows
    tiles = [image.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th)) for r in range(rows) for c in range(cols)]
    return [image, *tiles]
