"""Synthetic shapes: a tiny vision-language task a small model learns in a few hundred steps.

Each 64x64 image holds 1-3 shapes (circle, square, triangle), each type at most once and
each in its own colour (red, green, blue, yellow), one shape per quadrant, so every
question has one answer. Answers are one word, a number or a letter.

    DIR/images/{train,eval}_NNNNN.png
    DIR/pretrain.jsonl         "<image>\\nDescribe the image." -> "a circle in blue and a square in red.",
                               with "regions": each shape's box and phrase ("blue circle")
    DIR/finetune.jsonl         every question an image has, each its own one-turn record: the
                               colour of each shape, which kind has a colour (in words and as
                               lettered choices), the count, presence of each kind (about 14 per
                               image); then 4 text-only option drills per image
    DIR/eval/questions.jsonl   {question_id, image, text, category}, on held-out images
    DIR/eval/answers.json      {question_id: [accepted answers]}
    DIR/shapes.json            the generator's parameters

Image paths in the records are relative to `DIR/images` (the image folder). Output is
byte-identical for a given (seed, n_train, n_eval). Run:
`vrwkv prepare-data synthetic-shapes --out data/shapes` (2000 train + 200 eval images,
about two seconds).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vrwkv_core.errors import DataError
from vrwkv_core.fsutil import atomic_write_bytes, atomic_write_text
from vrwkv_core.progress import Progress

IMAGE_SIZE = 64
BACKGROUND = (255, 255, 255)
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
CATEGORIES = ("color", "count", "presence", "choice")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
CAPTION_PROMPT = "Describe the image."
# recorded in shapes.json ("captions"): data drawn by an older version is drawn again
CAPTION_STYLE = "kind-first+one-question-records+option-drills+regions"
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
DEFAULT_TRAIN, DEFAULT_EVAL, DEFAULT_SEED = 2000, 200, 0
CHOICE_ORDERS = 3  # lettered choices per shape in finetune.jsonl, each with its own option order
DRILLS_PER_IMAGE = 4  # text-only option drills in finetune.jsonl per training image
DRILL_WEIGHTS = (0.7, 0.2, 0.1)  # how often a drill asks for each of SHAPES


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    quadrant: int  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right


def random_scene(rng: random.Random) -> list[Shape]:
    """1-3 shapes of distinct kinds and colours, in distinct quadrants, in reading order."""
    k = rng.randint(1, 3)
    kinds = rng.sample(SHAPES, k)
    colors = rng.sample(sorted(COLORS), k)
    quadrants = sorted(rng.sample(range(4), k))
    return [Shape(kind, color, q) for kind, color, q in zip(kinds, colors, quadrants)]


def render(scene: list[Shape], rng: random.Random) -> tuple[bytes, list[list[int]]]:
    """PNG bytes of the scene (each shape 16-26 px, jittered inside its quadrant) and each
    shape's box [x0, y0, x1, y1] in pixels (x1, y1 exclusive), in the scene's order."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    half = IMAGE_SIZE // 2
    boxes = []
    for s in scene:
        size = rng.randint(16, 26)
        x0 = (s.quadrant % 2) * half + rng.randint(2, half - size - 2)
        y0 = (s.quadrant // 2) * half + rng.randint(2, half - size - 2)
        boxes.append([x0, y0, x0 + size, y0 + size])
        box = (x0, y0, x0 + size - 1, y0 + size - 1)
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + (size - 1) / 2, y0), (x0, y0 + size - 1), (x0 + size - 1, y0 + size - 1)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), boxes


def regions(scene: list[Shape], boxes: list[list[int]]) -> list[dict]:
    """The record's region labels: each shape's box and phrase ("blue circle"), which the
    tower pretraining of stage 1 learns from (`pretrain.tower_steps`)."""
    return [{"box": box, "phrase": f"{s.color} {s.kind}"} for s, box in zip(scene, boxes)]


def caption(scene: list[Shape]) -> str:
    """The stage-1 caption: shapes by kind (circle, square, triangle), each kind before its colour.

    The first word after "a" asks which kinds are present (as the presence questions do) and the
    colour after a kind binds kind to colour (as the colour questions do); with a tower that sees
    kinds, stage 1 on these captions answers the colour questions at 100%. But given the shape
    count, the sorted order alone makes 78% of the kind words predictable, and the tiny tower
    trained from scratch does not learn kinds from them in 150 steps (issue 28; neither from
    reading-order or colour-first captions).
    """
    parts = [f"a {s.kind} in {s.color}" for s in sorted(scene, key=lambda s: SHAPES.index(s.kind))]
    if len(parts) == 1:
        return parts[0] + "."
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


COUNT_QUESTION = "How many shapes are there?"


def color_question(s: Shape) -> tuple[str, str]:
    """(text, answer) asking the colour of shape `s`."""
    return f"What color is the {s.kind}?", s.color


def presence_question(kind: str, present: bool) -> tuple[str, str]:
    """(text, answer) asking whether a shape of `kind` is in the image."""
    return f"Is there a {kind}?", "yes" if present else "no"


def lettered_choice(question: str, kind: str, rng: random.Random) -> tuple[str, str]:
    """(text, letter): `question` with the three kinds as options A-C in an order drawn by `rng`,
    answered with the letter of `kind`."""
    options = list(SHAPES)
    rng.shuffle(options)
    lines = [f"{letter}. {k}" for letter, k in zip("ABC", options)]
    return f"{question}\n" + "\n".join(lines) + "\n" + CHOICE_SUFFIX, "ABC"[options.index(kind)]


def choice_question(s: Shape, rng: random.Random) -> tuple[str, str]:
    """(text, letter) asking which kind has `s`'s colour among the three kinds, shuffled by `rng`."""
    return lettered_choice(f"Which shape is {s.color}?", s.kind, rng)


def make_question(category: str, scene: list[Shape], rng: random.Random) -> tuple[str, list[str]]:
    """(question text, accepted answers; the first is the training answer)."""
    if category == "color":
        text, answer = color_question(rng.choice(scene))
        return text, [answer]
    if category == "count":
        return COUNT_QUESTION, [str(len(scene)), NUMBER_WORDS[len(scene)]]
    if category == "presence":
        present = [s.kind for s in scene]
        absent = [k for k in SHAPES if k not in present]
        ask_present = not absent or rng.random() < 0.5
        text, answer = presence_question(rng.choice(present if ask_present else absent), ask_present)
        return text, [answer]
    if category == "choice":
        text, letter = choice_question(rng.choice(scene), rng)
        return text, [letter]
    raise ValueError(f"unknown category {category!r}")


def kind_question(s: Shape) -> tuple[str, str]:
    """(text, answer) asking which kind has `s`'s colour, answered with the kind's name."""
    return f"Which shape is {s.color}?", s.kind


def finetune_questions(scene: list[Shape], rng: random.Random) -> list[tuple[str, str]]:
    """Every (question, training answer) the scene has, shuffled: per shape its colour, which
    kind has its colour (in words, and as a lettered choice with three option orders), the
    count, presence of each kind (absent kinds included).

    Each becomes its own record (`finetune_records`): asked together in one conversation, later
    answers follow from earlier ones (the number of "yes" is the count, the last colour asked is
    the one left), and stage 2 learned those shortcuts instead of looking at the image. The
    lettered choice needs two things at once, the kind of the shape with that colour and the
    letter of that kind among the options; the question in words and the extra option orders
    give stage 2 each part on its own (issue 28).
    """
    pairs = []
    for s in scene:
        pairs += [color_question(s), kind_question(s)] + [choice_question(s, rng) for _ in range(CHOICE_ORDERS)]
    pairs.append((COUNT_QUESTION, str(len(scene))))
    present = {s.kind for s in scene}
    pairs += [presence_question(kind, kind in present) for kind in SHAPES]
    rng.shuffle(pairs)
    return pairs


def finetune_records(rid: str, image: str, scene: list[Shape], rng: random.Random) -> list[dict]:
    """One LLaVA record per question of `finetune_questions`, ids `{rid}-qN`."""
    return [{"id": f"{rid}-q{j}", "image": [image], "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": answer}]}
        for j, (q, answer) in enumerate(finetune_questions(scene, rng))]


def option_drill(rng: random.Random) -> tuple[str, str]:
    """A text-only lettered choice that names the kind ("Which shape is the circle?" + the
    three kinds in a random order): the letter lookup without the image.

    The asked kind is skewed (DRILL_WEIGHTS): with all kinds equally likely the letter had no
    signal of its own and these drills stayed at chance for 150 steps; skewed, "the circle's
    letter" is learned first and the lookup for the others follows (issue 28).
    """
    kind = rng.choices(SHAPES, weights=DRILL_WEIGHTS)[0]
    return lettered_choice(f"Which shape is the {kind}?", kind, rng)


def drill_records(n: int, rng: random.Random) -> list[dict]:
    """`n` text-only records of `option_drill`, ids `shapes-drill-NNNNN`."""
    return [{"id": f"shapes-drill-{i:05d}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for i, (q, a) in enumerate(option_drill(rng) for _ in range(n))]


def _write_all(root: Path, n_train: int, n_eval: int, seed: int, progress: Progress) -> None:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    (root / "eval").mkdir(exist_ok=True)
    progress.start("drawing shapes", total=n_train + n_eval)
    # separate streams so changing n_eval does not change the training images
    train_rng, eval_rng = random.Random(f"shapes-train-{seed}"), random.Random(f"shapes-eval-{seed}")
    question_rng = random.Random(f"shapes-questions-{seed}")

    pretrain, finetune = [], []
    for i in range(n_train):
        name = f"train_{i:05d}.png"
        scene = random_scene(train_rng)
        png, boxes = render(scene, train_rng)
        # no fsync per image (2200 of them; ~5 ms each): the set is cheap to draw again
        atomic_write_bytes(images / name, png, fsync=False)
        rid = f"shapes-train-{i:05d}"
        pretrain.append({"id": rid, "image": [name], "conversations": [
            {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
            {"from": "gpt", "value": caption(scene)},
        ], "regions": regions(scene, boxes)})
        finetune += finetune_records(rid, name, scene, question_rng)
        progress.update(1)
    finetune += drill_records(DRILLS_PER_IMAGE * n_train, question_rng)

    questions, answers_by_id = [], {}
    for i in range(n_eval):
        name = f"eval_{i:05d}.png"
        scene = random_scene(eval_rng)
        atomic_write_bytes(images / name, render(scene, eval_rng)[0], fsync=False)
        cat = CATEGORIES[i % len(CATEGORIES)]
        q, answers = make_question(cat, scene, eval_rng)
        qid = f"shapes-{i:05d}"
        questions.append({"question_id": qid, "image": name, "text": q, "category": cat})
        answers_by_id[qid] = answers
        progress.update(1)

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows)

    atomic_write_text(root / "pretrain.jsonl", jsonl(pretrain))
    atomic_write_text(root / "finetune.jsonl", jsonl(finetune))
    atomic_write_text(root / "eval" / "questions.jsonl", jsonl(questions))
    atomic_write_text(root / "eval" / "answers.json", json.dumps(answers_by_id, indent=1) + "\n")
    meta = {"captions": CAPTION_STYLE, "seed": seed, "n_train": n_train, "n_eval": n_eval, "image_size": IMAGE_SIZE,
            "image_folder": "images", "colors": sorted(COLORS), "shapes": list(SHAPES)}
    atomic_write_text(root / "shapes.json", json.dumps(meta, indent=1) + "\n")


def redraw_if_stale(root: str | os.PathLike, progress: Progress | None = None) -> bool:
    """Draw a shapes folder made by an older version again (same seed and sizes, today's
    captions); True when it did. A folder without shapes.json is not ours and is left alone."""
    try:
        meta = json.loads((Path(root) / "shapes.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("captions") == CAPTION_STYLE:
        return False
    try:
        sizes = {k: int(meta[k]) for k in ("n_train", "n_eval", "seed")}
    except (KeyError, TypeError, ValueError):
        return False
    prepare_shapes(root, progress=progress, **sizes)
    return True


def prepare_shapes(
    out_dir: str | os.PathLike,
    n_train: int = DEFAULT_TRAIN,
    n_eval: int = DEFAULT_EVAL,
    seed: int = DEFAULT_SEED,
    progress: Progress | None = None,
) -> Path:
    """Write the shapes data set to `out_dir` and return it.

    A new folder is built beside its final name and renamed into place, so an existing
    `out_dir` is always complete (the recipe runner prepares it only when missing).
    """
    if n_train < 1 or n_eval < 0:
        raise DataError(f"synthetic shapes need at least 1 training image and 0 or more eval images (got {n_train}, {n_eval})")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --out is a file, not a folder", hint="choose a folder for the shapes data")
    progress = progress or Progress()
    try:
        if out.exists():
            _write_all(out, n_train, n_eval, seed, progress)
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            _write_all(tmp, n_train, n_eval, seed, progress)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        progress.close()
    return out
