"""Property tests: random bytes and random structures never give anything but a VrwkvError
or a valid result, for the recipe loader, the JSON/JSONL readers and the archive extractor."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vrwkv_core.errors import VrwkvError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name")
SETTINGS = settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Random YAML-ish structures: scalars of every YAML type, nested a few levels.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20))  # fmt: skip
structures = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
                          max_leaves=20)  # fmt: skip
# Keys that exist in the schema, so random values reach the type and range checks.
SCHEMA_KEYS = ["pretrain.lr_init", "pretrain.max_steps", "data.ctx_len", "data.val_fraction", "model.rwkv.n_embd",
               "model.rwkv.head_size", "model.vision.towers", "hardware.devices", "pretrain.out_dir", "name",
               "model.tokens_per_image", "finetune.lr_final", "pretrain.seed"]  # fmt: skip


def _nest(key: str, value: object) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value  # type: ignore[return-value]


def _load(tmp: Path, data: bytes):
    from vrwkv_core.config import Recipe, load_recipe

    path = tmp / "r.yaml"
    path.write_bytes(data)
    try:
        recipe = load_recipe(path)
    except VrwkvError as err:
        assert str(err) and "\n" not in str(err)
        return None
    assert isinstance(recipe, Recipe)
    return recipe


@SETTINGS
@given(data=st.binary(max_size=400))
def test_recipe_loader_random_bytes(tmp_path, data):
    _load(tmp_path, data)


@pytest.mark.parametrize("key", ["a\nb", "pretrain.\x85lr", "model.rwkv\tx"])
def test_unknown_keys_with_control_characters_stay_on_one_line(tmp_path, key):
    """A key YAML allows may hold a line break (hypothesis found one): the error shows it escaped."""
    from vrwkv_core.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({key: 1}) + "\n")  # JSON is YAML; it quotes and escapes the key
    with pytest.raises(VrwkvError) as err:
        load_recipe(path)
    assert "\n" not in str(err.value) and "unknown key" in str(err.value) and repr(key.split(".")[-1])[1:-1] in str(err.value)


@SETTINGS
@given(structure=structures)
def test_recipe_loader_random_structures(tmp_path, structure):
    _load(tmp_path, yaml.safe_dump(structure).encode())


@SETTINGS
@given(key=st.sampled_from(SCHEMA_KEYS), value=structures)
def test_recipe_loader_random_values_for_real_keys(tmp_path, key, value):
    recipe = _load(tmp_path, yaml.safe_dump(_nest(key, value)).encode())
    if recipe is not None:  # accepted values are in range
        assert recipe.pretrain.lr_init > 0 and recipe.data.ctx_len >= 1 and 0 <= recipe.data.val_fraction < 1


def _readers(path: Path) -> list:
    from vrwkv_core.data.sources import iter_records
    from vrwkv_core.eval.answers import read_answers
    from vrwkv_core.eval.benchmarks import read_json, read_jsonl
    from vrwkv_core.eval.generate import read_answer_file
    from vrwkv_core.eval.questions import load_questions

    return [lambda: read_json(path, "file"), lambda: read_jsonl(path, "file"), lambda: read_answers(path),
            lambda: read_answer_file(path), lambda: list(iter_records(path)), lambda: load_questions(path)]  # fmt: skip


def _check_readers(path: Path) -> None:
    for read in _readers(path):
        try:
            read()
        except VrwkvError as err:
            assert str(err) and str(path) in str(err) or "no records" in str(err) or "question" in str(err)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_json_readers_random_bytes(tmp_path, data):
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    _check_readers(path)


@SETTINGS
@given(rows=st.lists(structures, max_size=4), bad=st.binary(max_size=8))
def test_json_readers_random_structures(tmp_path, rows, bad):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + bad)
    _check_readers(path)
    path.write_text(json.dumps(rows))
    _check_readers(path)


names = st.text(alphabet="ab./\\:\x00-_", min_size=0, max_size=12)
members = st.lists(st.tuples(names, st.sampled_from(["file", "dir", "sym", "hard", "fifo"]), st.binary(max_size=20)),
                   max_size=6)  # fmt: skip


def _make_tar(path: Path, items: list) -> None:
    kinds = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
             "fifo": tarfile.FIFOTYPE}  # fmt: skip
    with tarfile.open(path, "w") as tf:
        for name, kind, data in items:
            info = tarfile.TarInfo(name or "x")
            info.type = kinds[kind]
            if kind in ("sym", "hard"):
                info.linkname = "../outside"
                tf.addfile(info)
            elif kind == "file":
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)


def _extract(tmp: Path, archive: Path) -> None:
    from vrwkv_core.data.archive import extract_archive

    out = tmp / "out"
    try:
        report = extract_archive(archive, out)
    except VrwkvError as err:
        assert str(archive) in str(err)
        return
    root = out.resolve()
    for p in out.rglob("*"):  # nothing written outside the folder, no links made
        assert not p.is_symlink() and p.resolve().is_relative_to(root)
    assert report.extracted + report.skipped + len(report.refused) >= 0


@SETTINGS
@given(items=members)
def test_extractor_random_tar(tmp_path, items):
    import shutil

    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    archive = tmp_path / "a.tar"
    _make_tar(archive, items)
    _extract(tmp_path, archive)


@SETTINGS
@given(items=st.lists(st.tuples(names, st.binary(max_size=20)), max_size=6))
def test_extractor_random_zip(tmp_path, items):
    import shutil

    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in items:
            zf.writestr(name.replace("\x00", "") or "x", data)
    _extract(tmp_path, archive)


@SETTINGS
@given(data=st.binary(min_size=1, max_size=600), cut=st.integers(0, 600))
def test_extractor_random_bytes_and_truncation(tmp_path, data, cut):
    import shutil

    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    archive = tmp_path / "a.tar"
    _make_tar(archive, [("f", "file", data)])
    raw = archive.read_bytes()
    archive.write_bytes(raw[:cut] + data)  # a cut-off header followed by junk
    _extract(tmp_path, archive)
