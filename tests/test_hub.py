"""vrwkv_core.hub and `vrwkv download`, against a fake hub on 127.0.0.1 (tests/fake_hub.py).

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import, so every test that talks to
the fake hub runs the code in a subprocess with those set. In-process tests keep
huggingface_hub offline (its HF_HUB_OFFLINE constant is patched) so none can reach a network.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_hub import COMMIT, FakeHub  # noqa: E402

from vrwkv_core.errors import DownloadError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = hashlib.sha256(b"seed").digest() * 4096  # 128 KiB, deterministic
TEST_ARTIFACTS = [
    {"name": "t-model", "kind": "model", "repo_id": "org/tiny",
     "files": [{"filename": "w.pth", "size": len(SMALL)}, {"filename": "config.json"}]},
    {"name": "t-data", "kind": "dataset", "repo_id": "org/data", "repo_type": "dataset",
     "files": [{"filename": "train.json"}]},
    {"name": "t-big", "kind": "model", "repo_id": "org/big", "files": [{"filename": "big.bin"}]},
    {"name": "t-bad", "kind": "model", "repo_id": "org/bad", "files": [{"filename": "w.pth"}]},
    {"name": "t-pinned", "kind": "model", "repo_id": "org/tiny", "files": [{"filename": "w.pth", "sha256": "0" * 64}]},
    {"name": "t-gated", "kind": "model", "repo_id": "org/gated", "files": [{"filename": "w.pth"}]},
    {"name": "t-norepo", "kind": "model", "repo_id": "org/missing", "files": [{"filename": "w.pth"}]},
    {"name": "t-nofile", "kind": "model", "repo_id": "org/tiny", "files": [{"filename": "nope.bin"}]},
    {"name": "t-ext", "kind": "eval-data", "repo_id": None, "subdir": "ext", "source": "https://example.org/x.zip",
     "notes": "unzip it", "files": [{"filename": "x.json"}]},
]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    """Isolated HF_HOME, vrwkv record and test registry; huggingface_hub offline in this process."""
    reg = tmp_path / "registry.json"
    reg.write_text(json.dumps({"artifacts": TEST_ARTIFACTS}))
    for var in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("VRWKV_CACHE_DIR", str(tmp_path / "vrwkv"))
    monkeypatch.setenv("VRWKV_REGISTRY", str(reg))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


@pytest.fixture
def fake_hub():
    with FakeHub() as hub:
        hub.add_file("org/tiny", "w.pth", SMALL)
        hub.add_file("org/tiny", "config.json", b'{"n_layer": 2}\n', lfs=False)
        hub.add_file("org/data", "train.json", b"[]\n", repo_type="dataset")
        hub.add_file("org/bad", "w.pth", SMALL, advertise=sha(b"something else"))
        hub.gate("org/gated")
        yield hub


PRELUDE = """
import json, os, sys
from vrwkv_core import hub
from vrwkv_core.errors import DownloadError
def attempt(fn, *a, **k):
    try:
        return {"ok": str(fn(*a, **k))}
    except DownloadError as e:
        return {"error": str(e), "hint": e.hint}
"""


def sub_env(tmp_path: Path, hub: FakeHub | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), VRWKV_CACHE_DIR=str(tmp_path / "vrwkv"),
               VRWKV_REGISTRY=str(tmp_path / "registry.json"), HF_HUB_DISABLE_XET="1",
               HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
    if hub is not None:
        env["HF_ENDPOINT"] = hub.endpoint
    env.update(extra)
    return env


def run_py(code: str, env: dict[str, str], timeout: float = 60) -> dict:
    """Runs PRELUDE + code in a fresh interpreter; the code prints one JSON object last."""
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prefill_cache(tmp_path: Path, repo: str, filename: str, data: bytes, blob_name: str | None = None) -> Path:
    """Writes a huggingface_hub cache entry by hand: blobs/<sha256>, snapshots/<commit>/file, refs/main."""
    root = tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--"))
    blob = root / "blobs" / (blob_name or sha(data))
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snap = root / "snapshots" / COMMIT / filename
    snap.parent.mkdir(parents=True)
    snap.symlink_to(os.path.relpath(blob, snap.parent))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snap


# Registry ------------------------------------------------------------------------------------

def test_builtin_registry_names_and_pins():
    from vrwkv_core.hub import get_artifact, list_artifacts
    from vrwkv_core.hub.registry import BUILTIN, KINDS

    names = {a.name for a in BUILTIN}
    for required in ("rwkv7-world-0b1", "rwkv7-world-0b4", "rwkv7-world-1b5", "visualrwkv-v0700-0b1",
                     "visualrwkv-v0700-0b4", "visualrwkv-v0700-1b5", "dinov2-l14-reg4", "siglip-so400m-14-384",
                     "sam-vit-b", "llava-pretrain", "llava-instruct-mix665k", "visualrwkv-v060-1b6",
                     "visualrwkv-v060-3b", "visualrwkv-v060-7b", "rwkv6-world-1b6", "rwkv6-world-3b",
                     "rwkv6-world-7b", "clip-vit-l14-336"):
        assert required in names
    assert any(a.kind == "eval-data" for a in BUILTIN)
    for art in BUILTIN:
        assert art.kind in KINDS and art.files
        assert art.on_hub or (art.source and art.notes), art.name
    art = get_artifact("hub:rwkv7-world-0b1")
    assert art.repo_id == "BlinkDL/rwkv-7-world"
    assert art.files[0].sha256 == "60c98129b9529963bff2c164b8ab4bd17c19332ae06dc2dcae32aa3a3739295a"
    assert get_artifact("llava-pretrain").repo_type == "dataset"
    assert "t-model" in {a.name for a in list_artifacts()}  # the extra registry


def test_unknown_name_suggests(monkeypatch):
    from vrwkv_core.hub import get_artifact

    with pytest.raises(DownloadError, match="unknown artifact 'visualrkwv-v0700-0b1'") as info:
        get_artifact("visualrkwv-v0700-0b1")
    assert info.value.hint.startswith("did you mean visualrwkv-v0700-0b1")


def test_extra_registry_errors(env):
    from vrwkv_core.hub import list_artifacts

    reg = env / "registry.json"
    reg.write_text(json.dumps({"artifacts": [{"name": "rwkv7-world-0b1", "repo_id": "a/b", "files": ["x"]}]}))
    with pytest.raises(DownloadError, match="shadow a built-in"):
        list_artifacts()
    reg.write_text('{"artifacts": [\n  {"name": "x",}\n]}')
    with pytest.raises(DownloadError, match=r"registry.json:2: not valid JSON"):
        list_artifacts()
    reg.write_text(json.dumps({"artifacts": [{"name": "x", "kind": "weights", "files": ["a"]}]}))
    with pytest.raises(DownloadError, match="kind 'weights'"):
        list_artifacts()


# Offline, in-process: a cache filled by hand ---------------------------------------------------

def test_offline_hit_hashes_unverified_cache_file_once(env, monkeypatch):
    from vrwkv_core import hub
    from vrwkv_core.hub import integrity

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = prefill_cache(env, "org/data", "train.json", b"[1, 2]\n")
    # A dataset repo lives under datasets--; the artifact is a dataset, so this copy must not count.
    assert hub.local_status("t-data") == "absent"
    snap = prefill_cache(env, "org/big", "big.bin", SMALL)
    assert hub.local_status("t-big") == "present (not verified)"
    calls = []
    real = integrity.hash_file
    monkeypatch.setattr(integrity, "hash_file", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    assert hub.resolve("hub:t-big") == snap
    assert hub.download("t-big") == snap
    assert calls == [snap]  # hashed before first use, then trusted from the record
    entry = json.loads((env / "vrwkv" / "verified.json").read_text())["files"][str(snap)]
    assert entry["sha256"] == sha(SMALL) and entry["expected"] == sha(SMALL)
    assert hub.local_status("t-big") == "verified"


def test_offline_miss_names_the_command(env, monkeypatch):
    from vrwkv_core import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE.*`vrwkv download t-model`"):
        hub.download("t-model")
    with pytest.raises(DownloadError, match=r"t-model is not downloaded yet: run `vrwkv download t-model`"):
        hub.resolve("hub:t-model")
    with pytest.raises(DownloadError, match=r"run `vrwkv download t-model --dir "):
        hub.resolve("t-model", dir=env / "models")


def test_corrupt_cache_blob_is_refused(env, monkeypatch):
    from vrwkv_core import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = prefill_cache(env, "org/big", "big.bin", SMALL, blob_name=sha(b"the real file"))
    with pytest.raises(DownloadError) as info:
        hub.resolve("t-big")
    msg = str(info.value)
    assert str(snap) in msg and sha(b"the real file") in msg and sha(SMALL) in msg and "mismatch" in msg
    assert "--force" in info.value.hint
    record = env / "vrwkv" / "verified.json"
    assert not record.exists() or str(snap) not in record.read_text()


def test_verify_detects_a_changed_file(env, monkeypatch):
    from typer.testing import CliRunner

    from vrwkv_cli.download import app
    from vrwkv_core import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = prefill_cache(env, "org/big", "big.bin", SMALL)
    report = hub.verify("t-big")
    assert report.ok and report.files[0].actual == sha(SMALL)
    result = CliRunner().invoke(app, ["--verify", "t-big"])
    assert result.exit_code == 0, result.output
    os.chmod(snap.resolve(), 0o644)
    snap.resolve().write_bytes(SMALL[:-1] + b"!")
    report = hub.verify("t-big")
    assert not report.ok and report.files[0].expected.digest == sha(SMALL)
    assert "mismatch" in report.files[0].describe()
    result = CliRunner().invoke(app, ["--verify", "t-big"])
    assert isinstance(result.exception, DownloadError) and "verification failed" in str(result.exception)
    missing = hub.verify("t-model")
    assert not missing.ok and missing.files[0].path is None


def test_dir_copy_checked_against_hub_metadata(env, monkeypatch):
    from vrwkv_core import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = env / "models" / "t-big"
    meta = folder / ".cache" / "huggingface" / "download" / "big.bin.metadata"
    meta.parent.mkdir(parents=True)
    (folder / "big.bin").write_bytes(SMALL)
    meta.write_text(f"{COMMIT}\n{sha(b'other')}\n{time.time()}\n")  # what huggingface_hub writes
    with pytest.raises(DownloadError, match=f"expected {sha(b'other')} \\(the hub ETag recorded by huggingface_hub\\)"):
        hub.resolve("t-big", dir=env / "models")
    meta.write_text(f"{COMMIT}\n{sha(SMALL)}\n{time.time()}\n")
    assert hub.resolve("t-big", dir=env / "models") == folder / "big.bin"
    assert hub.local_status("t-big", dir=env / "models") == "verified"
    assert hub.resolve("hub:t-big") == folder / "big.bin"  # found later without --dir, via the record


def test_resolve_paths_and_names(env, monkeypatch):
    from vrwkv_core import hub

    real = env / "model.pth"
    real.write_bytes(b"x")
    assert hub.resolve(str(real)) == real
    assert hub.resolve("runs/missing.pth") == Path("runs/missing.pth")  # the caller reports it
    with pytest.raises(DownloadError, match="unknown artifact 'rwkv7-wrld-0b1'") as info:
        hub.resolve("rwkv7-wrld-0b1")
    assert "rwkv7-world-0b1" in info.value.hint
    with pytest.raises(DownloadError, match="unknown artifact"):
        hub.resolve("hub:nothing-like-it")


def test_external_artifact_explains_where_it_comes_from(env):
    from vrwkv_core import hub

    with pytest.raises(DownloadError, match=r"not on the Hugging Face hub: get it from https://example.org/x") as info:
        hub.download("t-ext", dir=env / "data")
    assert "unzip it" in info.value.hint and str(env / "data" / "ext") in info.value.hint
    assert hub.local_status("t-ext") == "manual download"
    (env / "data" / "ext").mkdir(parents=True)
    (env / "data" / "ext" / "x.json").write_text("{}")
    assert hub.resolve("t-ext", dir=env / "data") == env / "data" / "ext" / "x.json"
    assert hub.local_status("t-ext", dir=env / "data") == "present (hashed, no reference hash)"
    assert hub.verify("t-ext", dir=env / "data").ok
    (env / "data" / "ext" / "x.json").write_text("{changed}")
    report = hub.verify("t-ext", dir=env / "data")  # compared with the hash taken at first use
    assert not report.ok and "recorded when first used" in report.files[0].describe()
    with pytest.raises(DownloadError, match="llava-eval is not on the Hugging Face hub.*1atZSBBrAX54"):
        hub.download("llava-eval")


def test_error_mapping_one_line_each(env, monkeypatch):
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import hf_raise_for_status

    from vrwkv_core.hub import get_artifact
    from vrwkv_core.hub.fetch import map_error

    art = get_artifact("t-model")

    def hub_error(status: int, code: str | None) -> Exception:
        url = "http://127.0.0.1:9/org/tiny/resolve/main/w.pth"
        headers = {"X-Error-Code": code} if code else {}
        response = httpx2.Response(status, headers=headers, request=httpx2.Request("HEAD", url))
        with pytest.raises(Exception) as info:
            hf_raise_for_status(response)
        return info.value

    cases = {
        "gated repo": hub_error(403, "GatedRepo"),
        "not found (or private": hub_error(401, "RepoNotFound"),
        "w.pth not found in org/tiny": hub_error(404, "EntryNotFound"),
        "revision 'v9' not found": hub_error(404, "RevisionNotFound"),
        "HTTP 500": hub_error(500, None),
        "network error while downloading w.pth": httpx2.ConnectError("connection refused"),
        "failed: [Errno 28] No space left on device": OSError(28, "No space left on device"),
    }
    for expected, err in cases.items():
        mapped = map_error(err, art, "w.pth", "v9")
        assert mapped is not None and expected in str(mapped), (expected, str(mapped))
        assert "\n" not in str(mapped)
    assert "HF_TOKEN" in map_error(cases["gated repo"], art, "w.pth", None).hint
    lost = LocalEntryNotFoundError("not cached")
    lost.__cause__ = httpx2.ConnectError("connection refused")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert "cannot reach the hub" in str(map_error(lost, art, "w.pth", None))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set" in str(map_error(lost, art, "w.pth", None))
    assert map_error(KeyError("bug"), art, "w.pth", None) is None


def test_disk_space_check(env, monkeypatch):
    from vrwkv_core.hub.fetch import check_disk_space

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda p: usage(100, 90, 10_000))
    check_disk_space(10_000, env / "not" / "yet" / "there")
    with pytest.raises(DownloadError, match=r"needs 20.0 kB, .* has 10.0 kB free"):
        check_disk_space(20_000, env / "not" / "yet" / "there")


def test_stale_partials_are_removed_only_when_old(env):
    from vrwkv_core.hub import get_artifact
    from vrwkv_core.hub.fetch import _remove_stale_partials

    blobs = env / "hf" / "hub" / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    old, fresh = blobs / f"{'a' * 64}.1234abcd.incomplete", blobs / f"{'a' * 64}.5678abcd.incomplete"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    _remove_stale_partials(get_artifact("t-model"), "w.pth", "a" * 64, None)
    assert not old.exists() and fresh.exists()


def test_cli_list_and_unknown_name(env, monkeypatch):
    from typer.testing import CliRunner

    from vrwkv_cli.download import app

    monkeypatch.setenv("COLUMNS", "200")
    prefill_cache(env, "org/big", "big.bin", SMALL)
    result = CliRunner().invoke(app, ["--list"])
    assert result.exit_code == 0, result.output
    for name in ("rwkv7-world-0b1", "visualrwkv-v0700-1b5", "llava-pretrain", "t-model", "t-big"):
        assert name in result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 4}
    assert "absent" in rows["t-model"] and "present (not verified)" in rows["t-big"]
    assert "382.0 MB" in rows["rwkv7-world-0b1"] and "manual download" in rows["llava-eval"]
    result = CliRunner().invoke(app, ["rwkv7-world-0b9"])
    assert isinstance(result.exception, DownloadError) and "unknown artifact" in str(result.exception)
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2
    assert "Example: vrwkv download" in CliRunner().invoke(app, ["--help"]).output


# Through the fake hub, in subprocesses --------------------------------------------------------

def test_download_success_cache_and_dir(env, fake_hub):
    out = run_py("""
        first = attempt(hub.download, "t-model")
        again = attempt(hub.download, "t-model")
        resolved = attempt(hub.resolve, "hub:t-model")
        data = attempt(hub.download, "t-data", dir=os.environ["OUT_DIR"])
        from typer.testing import CliRunner
        from vrwkv_cli.download import app
        cli = CliRunner().invoke(app, ["t-model", "--dir", os.environ["OUT_DIR"]])
        status = hub.local_status("t-model")
        print(json.dumps({"first": first, "again": again, "resolved": resolved, "data": data,
                          "cli_code": cli.exit_code, "cli_out": cli.output, "status": status,
                          "verified": hub.verify("t-model").ok}))
    """, sub_env(env, fake_hub, OUT_DIR=str(env / "models"), HF_TOKEN="hf_fake_token"))
    path = Path(out["first"]["ok"])
    assert "Bearer hf_fake_token" in fake_hub.authorizations  # HF_TOKEN reaches the hub
    assert path.read_bytes() == SMALL and "models--org--tiny" in str(path)
    assert out["again"]["ok"] == str(path) and out["resolved"]["ok"] == str(path)
    assert len(fake_hub.gets("w.pth")) == 1  # --dir copies from the cache rather than fetching again
    assert Path(out["data"]["ok"]) == env / "models" / "t-data" / "train.json"
    assert out["cli_code"] == 0 and str(env / "models" / "t-model" / "w.pth") in out["cli_out"]
    assert (env / "models" / "t-model" / "config.json").read_bytes() == b'{"n_layer": 2}\n'
    assert out["status"] == "verified" and out["verified"] is True
    record = json.loads((env / "vrwkv" / "verified.json").read_text())["files"]
    assert record[str(path)]["expected"] == sha(SMALL)
    config = json.loads((env / "vrwkv" / "verified.json").read_text())["files"][str(path.parent / "config.json")]
    assert config["expected_algo"] == "git-sha1"  # non-LFS files are checked against their git blob id


def test_dropped_connection_resumes_with_range(env, fake_hub):
    big = os.urandom(12 * 1024 * 1024)
    fake_hub.add_file("org/big", "big.bin", big)
    fake_hub.drop_after("big.bin", 10 * 1024 * 1024 + 5000)  # past huggingface_hub's 10 MiB read chunk
    out = run_py('print(json.dumps(attempt(hub.download, "t-big")))', sub_env(env, fake_hub))
    assert Path(out["ok"]).read_bytes() == big
    ranges = [r for _, _, r in fake_hub.gets("big.bin")]
    assert ranges == [None, f"bytes={10 * 1024 * 1024}-"]


def test_killed_download_leaves_nothing_complete_and_rerun_finishes(env, fake_hub):
    from vrwkv_core import hub

    fake_hub.add_file("org/big", "big.bin", SMALL)
    fake_hub.stall_after("big.bin", 50_000)
    code = PRELUDE + 'print(json.dumps(attempt(hub.download, "t-big")))'
    proc = subprocess.Popen([sys.executable, "-c", code], env=sub_env(env, fake_hub), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert fake_hub.stalled.wait(30), "the download never started"
    finally:
        proc.kill()
        proc.communicate()
    fake_hub.release.set()
    repo = env / "hf" / "hub" / "models--org--big"
    partials = list((repo / "blobs").glob("*.incomplete"))
    assert partials and not list(repo.glob("snapshots/*/big.bin"))
    assert hub.local_status("t-big") == "absent"
    with pytest.raises(DownloadError, match="run `vrwkv download t-big`"):
        hub.resolve("t-big")
    for p in partials:  # as if the killed run was long ago
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    out = run_py('print(json.dumps(attempt(hub.download, "t-big")))', sub_env(env, fake_hub))
    assert Path(out["ok"]).read_bytes() == SMALL
    assert not list((repo / "blobs").glob("*.incomplete"))
    assert hub.local_status("t-big") == "verified"


def test_hash_mismatch_is_an_error_and_never_recorded(env, fake_hub):
    out = run_py("""
        bad = attempt(hub.download, "t-bad")
        again = attempt(hub.resolve, "t-bad")
        pinned = attempt(hub.download, "t-pinned")
        print(json.dumps({"bad": bad, "again": again, "pinned": pinned}))
    """, sub_env(env, fake_hub))
    advertised = sha(b"something else")
    assert f"expected {advertised}" in out["bad"]["error"] and f"got {sha(SMALL)}" in out["bad"]["error"]
    assert "w.pth" in out["bad"]["error"] and "--force" in out["bad"]["hint"]
    assert "mismatch" in out["again"]["error"]  # the bad copy in the cache is never handed out
    assert f"expected {'0' * 64} (the registry's pinned sha256)" in out["pinned"]["error"]
    record = env / "vrwkv" / "verified.json"
    assert not record.exists() or "models--org--bad" not in record.read_text()


def test_hub_refusals_and_disk_space(env, fake_hub):
    out = run_py("""
        import shutil, collections
        res = {n: attempt(hub.download, n) for n in ("t-gated", "t-norepo", "t-nofile", "nonexistent-model")}
        usage = collections.namedtuple("usage", "total used free")
        shutil.disk_usage = lambda p: usage(10**6, 10**6 - 1000, 1000)
        res["disk"] = attempt(hub.download, "t-model")
        print(json.dumps(res))
    """, sub_env(env, fake_hub))
    assert "org/gated is a gated repo" in out["t-gated"]["error"] and "HF_TOKEN" in out["t-gated"]["hint"]
    assert "hub repo org/missing not found" in out["t-norepo"]["error"]
    assert "nope.bin not found in org/tiny" in out["t-nofile"]["error"]
    assert "unknown artifact 'nonexistent-model'" in out["nonexistent-model"]["error"]
    assert "not enough disk space" in out["disk"]["error"]
    assert fake_hub.gets("w.pth") == []  # refused before any byte was fetched


def test_offline_subprocess_hit_and_miss(env, fake_hub):
    online = run_py('print(json.dumps(attempt(hub.download, "t-model")))', sub_env(env, fake_hub))
    before = len(fake_hub.requests)
    out = run_py("""
        print(json.dumps({"hit": attempt(hub.download, "t-model"), "miss": attempt(hub.download, "t-data"),
                          "resolve": attempt(hub.resolve, "hub:t-model")}))
    """, sub_env(env, fake_hub, HF_HUB_OFFLINE="1"))
    assert out["hit"]["ok"] == online["ok"] == out["resolve"]["ok"]
    assert "HF_HUB_OFFLINE" in out["miss"]["error"] and "`vrwkv download t-data`" in out["miss"]["error"]
    assert len(fake_hub.requests) == before  # offline means not one request
    fake_hub.gate("org/tiny")  # the hub now refuses: a complete, verified local copy is still used
    again = run_py('print(json.dumps(attempt(hub.download, "t-model")))', sub_env(env, fake_hub))
    assert again["ok"] == online["ok"] and len(fake_hub.requests) > before
