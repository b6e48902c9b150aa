"""Image tiling (`model.vision.tiling`): a global view plus a best-fit grid of tiles.

Grids (width x height, at image_size 448; scaled by image_size/448 otherwise):
448x896, 896x448, 896x896, 448x1344, 1344x448, i.e. (cols, rows) in tiles of
image_size: (1,2), (2,1), (2,2), (1,3), (3,1). The grid whose aspect ratio is closest to
the image's (in log space, ties to fewer tiles) wins; the image is resized to the grid
(bicubic) and cut row-major into image_size x image_size tiles. An image no larger than
one tile (both sides <= image_size) is not tiled.

What the data side does with it: a source image becomes `views = tile_image(img, size)`
(global view first, then the tiles), and each view is one image to the model. The human
turn carries one `<image>` marker per view (len(views) markers where the source image had
one, joined by `\\n` like any other images), each marker becomes tokens_per_image
placeholders, the sample's image count is len(views), and the processor output of the
views is stacked per tower key in that order. A sample thus costs
len(views) * tokens_per_image tokens of ctx_len per source image (up to 4x more).
"""

from __future__ import annotations

import math

from PIL import Image

GRIDS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))
"""(cols, rows) in tiles of image_size."""


def choose_grid(width: int, height: int) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect ratio best fits a width x height image."""
    aspect = math.log(width / height)

    def cost(grid: tuple[int, int]) -> tuple[float, int]:
        cols, rows = grid
        return (round(abs(aspect - math.log(cols / rows)), 9), cols * rows)

    return min(GRIDS, key=cost)


def tile_image(image: Image.Image, image_size: int) -> list[Image.Image]:
    """[global image, tiles row-major...]; just [image] when it fits in one tile."""
    image = image.convert("RGB")
    width, height = image.size
    if width <= image_size and height <= image_size:
        return [image]
    cols, rows = choose_grid(width, height)
    resized = image.resize((cols * image_size, rows * image_size), Image.BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    return [image, *tiles]
