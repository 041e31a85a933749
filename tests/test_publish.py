"""Publishing: model cards (upcycle / graft / train), `moemerge check`, `moemerge push`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergekit_lite.card import BEGIN, END, parse_front_matter, write_card
from mergekit_lite.check import check_folder
from mergekit_lite.errors import MoemergeError
from mergekit_lite.hub import push_folder, upload_files
from mergekit_lite.io.sidefiles import finish_folder, read_sidecar
from mergekit_lite.ops.upcycle import run_upcycle
from mergekit_lite.provenance import recipe_record

HUB_ID = "pico-org/llama-pico"


def _upcycle(tmp_path: Path, source: Path, out: Path, overwrite: bool = False, **fields) -> Path:
    body = {"source": str(source), "architecture": "mixtral", "num_experts": 4, "experts_per_token": 2, **fields}
    recipe = tmp_path / f"recipe-{out.name}.yaml"
    recipe.write_text("# upcycle for the publish tests\n" + yaml.safe_dump(body))
    run_upcycle(recipe, out, overwrite=overwrite, echo=lambda s: None)
    return recipe


@pytest.fixture(scope="module")
def hub_source(pico_factory, tmp_path_factory) -> Path:
    """A pico Llama laid out like a Hub snapshot in the HF cache, with a licensed card of its own."""
    snap = tmp_path_factory.mktemp("hf") / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / "0123abcd"
    shutil.copytree(pico_factory("llama"), snap)
    (snap / "README.md").write_text("---\nlicense: other\nlicense_name: pico-licence\n"
                                    "license_link: https://example.org/licence\n---\n# llama-pico\n")
    return snap


@pytest.fixture(scope="module")
def upcycled(hub_source, tmp_path_factory) -> tuple[Path, Path]:
    """(sharded upcycled output, its recipe)."""
    tmp = tmp_path_factory.mktemp("up")
    recipe = _upcycle(tmp, hub_source, tmp / "mixtral-4x", shard_size="600KB")
    return tmp / "mixtral-4x", recipe


def _card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    return parse_front_matter(text), text


# ---- model cards ---------------------------------------------------------------------------------
def test_upcycled_card_front_matter_and_body(upcycled):
    out, recipe = upcycled
    front, text = _card(out)
    assert front["base_model"] == [HUB_ID]
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert {"moe", "mergekit-lite", "upcycled"} <= set(front["tags"])
    assert (front["license"], front["license_name"]) == ("other", "pico-licence")
    record = read_sidecar(out)
    assert "# mixtral-4x\n" in text  # the final folder name, not AtomicDir's temporary one
    assert recipe.read_text().rstrip() in text  # recipe verbatim, comment header included
    assert hashlib.sha256(recipe.read_text().encode()).hexdigest()[:16] in text
    assert f"{record['total_params']:,}" in text and f"{record['active_params']:,}" in text
    assert "| layers | 4 |" in text and "4 per MoE layer, top-2" in text and "| dtype | float32 |" in text
    assert "AutoModelForCausalLM.from_pretrained" in text and text.count(BEGIN) == 1


def test_local_source_not_in_base_model_but_in_lineage(tmp_path, pico_llama):
    _upcycle(tmp_path, pico_llama, tmp_path / "out")
    front, text = _card(tmp_path / "out")
    assert "base_model" not in front  # the Hub rejects a path as base_model
    assert f"`{pico_llama}` (local folder)" in text


def _derived(parent: Path, where: Path, kind: str, extra: dict) -> Path:
    """A folder as graft/train leave it: parent's weights, a chained record, finished in a temp-named folder."""
    tmp = where / f".{kind}ed.moemerge-tmp-4242"
    shutil.copytree(parent, tmp, ignore=shutil.ignore_patterns("README.md", "moemerge.json"))
    config = json.loads((parent / "config.json").read_text())
    record = recipe_record(kind, f"# {kind} recipe\nsource: {parent}\n", [parent], extra)
    finish_folder(tmp, config, parent, record)
    write_card(tmp, record, config, parent)
    final = where / f"{kind}ed"
    tmp.rename(final)
    return final


def test_graft_and_train_cards_chain_lineage(upcycled, tmp_path):
    up, _ = upcycled
    graft = _derived(up, tmp_path, "graft", {"new_layers": [2, 3], "total_params": 600_000, "active_params": 400_000,
                                             "parity": {"max_abs": 3.2e-7, "mean_abs": 4.1e-8, "top1_agreement": 1.0}})
    train = _derived(graft, tmp_path, "train", {"training": {"steps": 120, "tokens": 491_520, "final_val_loss": 3.25,
                                                             "data": "pico-text"}})
    gf, gtext = _card(graft)
    assert gf["base_model"] == [HUB_ID] and {"moe", "upcycled", "depth-up-scaled"} <= set(gf["tags"])
    assert "# grafted\n" in gtext and "New layers (not in the source): 2, 3." in gtext
    assert r"| max \|Δlogits\| | 3.200e-07 |" in gtext and "| top-1 agreement | 100.00% |" in gtext
    tf, ttext = _card(train)
    assert {"moe", "upcycled", "depth-up-scaled", "trained", "mergekit-lite"} <= set(tf["tags"])
    assert tf["license"] == "other" and tf["pipeline_tag"] == "text-generation"
    steps = [s["step"] for s in read_sidecar(train)["lineage"]]
    assert steps == ["source", "upcycle", "graft", "train"]
    for step in read_sidecar(train)["lineage"][1:]:
        assert step["recipe_sha256"] in ttext
    assert "| steps | 120 |" in ttext and "| tokens | 491,520 |" in ttext and "| final_val_loss | 3.25 |" in ttext
    assert "# trained\n" in ttext and "## Recipe" in ttext


def test_existing_card_updated_not_clobbered(tmp_path, pico_llama):
    out = tmp_path / "m"
    _upcycle(tmp_path, pico_llama, out)
    text = (out / "README.md").read_text()
    front = parse_front_matter(text)
    front.update(language=["en"], license="mit", tags=[*front["tags"], "my-tag"])
    body = text.split("\n---\n", 1)[1]
    (out / "README.md").write_text("---\n" + yaml.safe_dump(front) + "---\n" + body + "\n## My notes\nKeep me.\n")
    _upcycle(tmp_path, pico_llama, out, overwrite=True, num_experts=8)
    _upcycle(tmp_path, pico_llama, out, overwrite=True, num_experts=8)  # twice: idempotent
    front, text = _card(out)
    assert front["language"] == ["en"] and front["license"] == "mit" and "my-tag" in front["tags"]
    assert text.count("Keep me.") == 1 and text.count(BEGIN) == 1 and text.count(END) == 1
    assert "8 per MoE layer" in text and "4 per MoE layer" not in text


def test_card_without_markers_keeps_user_text(tmp_path):
    (tmp_path / "README.md").write_text("# Hand-written\nSome words.\n")
    write_card(tmp_path, {"kind": "upcycle", "recipe": "a: 1\n", "lineage": []}, {"num_hidden_layers": 2},
               name="named")
    front, text = _card(tmp_path)
    assert front["tags"] == ["mergekit-lite"] and "# named\n" in text
    assert text.index(END) < text.index("# Hand-written\nSome words.")


# ---- check ---------------------------------------------------------------------------------------
def test_check_passes_on_upcycled_output(upcycled):
    report = check_folder(upcycled[0])
    assert len(report.shards) > 1 and report.tensors == 79
    index = json.loads((upcycled[0] / "model.safetensors.index.json").read_text())
    assert report.nbytes == index["metadata"]["total_size"]
    assert "OK" in report.lines()[0]


def _first_shard(d: Path) -> Path:
    return d / sorted(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())[0]


def _poke(path: Path, find: bytes, new: bytes) -> None:
    """Replace bytes inside a safetensors header."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    i = bytes(raw[8:8 + n]).index(find)
    raw[8 + i:8 + i + len(new)] = new
    path.write_bytes(raw)


def _nan(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    start = header[max(k for k in header if k != "__metadata__")]["data_offsets"][0]
    raw[8 + n + start + 8:8 + n + start + 12] = struct.pack("<f", float("nan"))
    path.write_bytes(raw)


def _edit_json(path: Path, fn) -> None:
    body = json.loads(path.read_text())
    fn(body)
    path.write_text(json.dumps(body))


CORRUPTIONS = {
    "shard deleted": (lambda d: _first_shard(d).unlink(), "missing"),
    "header byte": (lambda d: _poke(_first_shard(d), b'"F32"', b'"F16"'), "not a readable safetensors file"),
    "header json": (lambda d: _poke(_first_shard(d), b"{", b"X"), "not a readable safetensors file"),
    "nan": (lambda d: _nan(_first_shard(d)), "holds NaN"),
    "index names missing key": (lambda d: _edit_json(d / "model.safetensors.index.json", lambda b: b[
        "weight_map"].update({"model.layers.0.mlp.ghost.weight": _first_shard(d).name})), "mlp.ghost.weight"),
    "config expects absent tensor": (lambda d: _edit_json(d / "config.json", lambda b: b.update(
        num_hidden_layers=b["num_hidden_layers"] + 1)), "expects tensor 'model.layers.4."),
    "stray shard": (lambda d: shutil.copy(_first_shard(d), d / "model-00009-of-00009.safetensors"), "stray"),
    "total_size": (lambda d: _edit_json(d / "model.safetensors.index.json",
                                        lambda b: b["metadata"].update(total_size=1)), "total_size"),
    "no tokenizer": (lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
                     "no tokenizer"),
    "bad config": (lambda d: (d / "config.json").write_text('{"model_type": "no-such-model"}'), "AutoConfig"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_check_catches(upcycled, tmp_path, case):
    d = tmp_path / "broken"
    shutil.copytree(upcycled[0], d)
    corrupt, expected = CORRUPTIONS[case]
    corrupt(d)
    with pytest.raises(MoemergeError, match="(?s)" + expected.replace("(", r"\(").replace(".", r"\.")):
        check_folder(d)


def test_check_tied_head_may_be_absent_untied_may_not(tmp_path, pico_factory):
    d = tmp_path / "tied"
    shutil.copytree(pico_factory("llama", tied=True), d)
    assert check_folder(d).tensors == 38  # no lm_head.weight stored: it is the embedding
    _edit_json(d / "config.json", lambda b: b.update(tie_word_embeddings=False))
    with pytest.raises(MoemergeError, match="expects tensor 'lm_head.weight'"):
        check_folder(d)


def test_check_catches_unexpected_tensor(tmp_path, pico_llama):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "extra"
    shutil.copytree(pico_llama, d)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.mlp.extra.weight"] = sd["model.norm.weight"].clone()
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoemergeError, match="'model.layers.0.mlp.extra.weight' is stored but LlamaForCausalLM"):
        check_folder(d)


# ---- push ----------------------------------------------------------------------------------------
def test_push_dry_run_lists_the_right_files_without_network(upcycled, tmp_path, monkeypatch):
    d = tmp_path / "pub"
    shutil.copytree(upcycled[0], d)
    (d / "checkpoints" / "step-10").mkdir(parents=True)
    (d / "checkpoints" / "step-10" / "model.safetensors").write_bytes(b"x" * 10)
    (d / "optimizer.pt").write_bytes(b"x" * 20)
    (d / ".pub.moemerge-tmp-77").mkdir()
    (d / ".pub.moemerge-tmp-77" / "model.safetensors").write_bytes(b"x")
    (d / "extras").mkdir()
    (d / "extras" / "eval.json").write_text("{}")

    def no_network(*a, **k):
        raise AssertionError("dry run touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    lines: list[str] = []
    assert push_folder(d, "my-org/pico-moe", dry_run=True, echo=lines.append) == ""
    start = next(i for i, ln in enumerate(lines) if ln.startswith("would upload"))
    listed = {ln.split()[0] for ln in lines[start + 1:-1] if ln.startswith("  ")}
    weights = set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())
    expected = {"README.md", "config.json", "generation_config.json", "moemerge.json", "tokenizer.json",
                "tokenizer_config.json", "model.safetensors.index.json", *weights}
    assert listed == expected
    assert {r for r, _ in upload_files(d)} == expected
    assert any(ln.startswith("left out (1 files that are not part of a model folder): extras/eval.json")
               for ln in lines), lines
    assert "the repo would be PUBLIC if it is new (pass --private" in lines[-1]
    sizes = dict(upload_files(d))
    assert sizes["config.json"] == (d / "config.json").stat().st_size
    with_ckpt = {r for r, _ in upload_files(d, include_checkpoints=True)}
    assert with_ckpt - expected == {"checkpoints/step-10/model.safetensors", "optimizer.pt"}
    assert any("dry run: nothing was sent" in ln for ln in lines)


@pytest.mark.parametrize("secret", [".env", "hf_token", "id_rsa", ".netrc", "secrets/db.json", "deploy.pem",
                                    "credentials.json", ".aws/config"])
def test_push_refuses_a_folder_holding_a_credential(upcycled, tmp_path, secret):
    d = tmp_path / "pub"
    shutil.copytree(upcycled[0], d)
    (d / secret).parent.mkdir(parents=True, exist_ok=True)
    (d / secret).write_text("hf_abcdefghijklmnop")
    with pytest.raises(MoemergeError, match=r"looks like a credential .* push refuses to publish") as e:
        push_folder(d, "my-org/pico-moe", dry_run=True, echo=lambda _: None)
    assert "\n" not in str(e.value) and "hf_abcdefgh" not in str(e.value)


def test_push_refuses_a_failing_folder(upcycled, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(upcycled[0], d)
    _nan(_first_shard(d))
    with pytest.raises(MoemergeError, match="holds NaN"):
        push_folder(d, "my-org/x", dry_run=True, echo=lambda s: None)
    with pytest.raises(MoemergeError, match="not a Hub repo id"):
        push_folder(d, "not a repo", dry_run=True, echo=lambda s: None)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with block ends: nothing listens there


def test_push_without_network_fails_fast_in_one_line(upcycled):
    """The real CLI and upload path, with the Hub endpoint pointed at a closed local port."""
    token = "hf_NotARealTokenButLooksLikeOne1234"
    port = _closed_port()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_TOKEN=token)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mergekit_lite", "push", str(upcycled[0]), "--repo", "my-org/x"],
                          capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: push: cannot reach http://127.0.0.1:{port} ("), proc.stderr
    assert errors[0].endswith("nothing was sent"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and token not in proc.stderr + proc.stdout
    assert "pushed" not in proc.stdout
    assert elapsed < 30, f"took {elapsed:.1f}s (interpreter and transformers import included)"


def test_push_unauthorised_fails_in_one_line_and_creates_nothing(upcycled):
    """A local stand-in Hub that answers 401 to everything: push stops at the token check."""
    import http.server
    import threading

    seen: list[str] = []

    class Deny(http.server.BaseHTTPRequestHandler):
        def _deny(self):
            seen.append(f"{self.command} {self.path}")
            body = b'{"error": "Invalid credentials in Authorization header"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _deny

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = "hf_AnotherFakeTokenValue987654"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_TOKEN=token)
    try:
        proc = subprocess.run([sys.executable, "-m", "mergekit_lite", "push", str(upcycled[0]), "--repo", "my-org/x"],
                              capture_output=True, text=True, env=env, timeout=120)
    finally:
        server.shutdown()
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(errors) == 1 and "invalid user token" in errors[0].lower(), proc.stderr
    assert "Traceback" not in proc.stderr and token not in proc.stderr + proc.stdout and "pushed" not in proc.stdout
    assert "GET /api/whoami-v2" in seen  # the token check ran first ...
    assert not [r for r in seen if not r.startswith("GET ")]  # ... and nothing was created or uploaded


def test_check_command(upcycled, tmp_path):
    from typer.testing import CliRunner

    from mergekit_lite.cli import app

    result = CliRunner().invoke(app, ["check", str(upcycled[0])])
    assert result.exit_code == 0 and "OK" in result.output and "all finite" in result.output
    d = tmp_path / "b"
    shutil.copytree(upcycled[0], d)
    _first_shard(d).unlink()
    result = CliRunner().invoke(app, ["check", str(d)])
    assert isinstance(result.exception, MoemergeError)  # main() prints it on one line, exit 2


def test_lineage_end_to_end_upcycle_then_graft(upcycled, tmp_path):
    """The real `graft --expand` on an upcycled output: its card chains the lineage and it passes check."""
    from mergekit_lite.ops.graft import run_graft

    up, recipe = upcycled
    out = tmp_path / "mixtral-4x-pro"
    run_graft(up, out, expand=2, echo=lambda s: None)
    front, text = _card(out)
    assert front["base_model"] == [HUB_ID] and front["license"] == "other"
    assert {"moe", "upcycled", "depth-up-scaled", "mergekit-lite"} <= set(front["tags"])
    lineage = read_sidecar(out)["lineage"]
    assert [s["step"] for s in lineage] == ["source", "upcycle", "graft"]
    assert lineage[1]["recipe_sha256"] == hashlib.sha256(recipe.read_text().encode()).hexdigest()[:16]
    assert all(s["recipe_sha256"] in text for s in lineage[1:]) and "# mixtral-4x-pro\n" in text
    assert "| layers | 6 |" in text and "New layers (not in the source)" in text
    assert check_folder(out).tensors == 79 + 2 * 19  # two more Mixtral layers: 4 attn, 2 norms, router, 4x3 experts


# ---- push: only what belongs to the model, all of it ---------------------------------------------
def _snapshot(model: Path, where: Path) -> Path:
    from test_reader import hub_cache_snapshot  # tests/ is on sys.path (pytest's rootdir-less prepend mode)

    return hub_cache_snapshot(model, where)


@pytest.fixture()
def fake_hub(monkeypatch):
    """HfApi with no network: records the commit's operations as {path_in_repo: bytes sent}."""
    from huggingface_hub import HfApi

    sent: dict[str, bytes] = {}

    def commit(self, repo_id, operations, **kw):
        for op in operations:
            sent[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
        return type("Info", (), {"repo_url": f"https://hub.example/{repo_id}"})()

    monkeypatch.setenv("HF_TOKEN", "hf_FakeTokenForTheFakeHub123")
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"name": "tester"})
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "create_commit", commit)
    return sent


def test_push_of_a_hub_cache_snapshot_uploads_the_link_targets(upcycled, tmp_path, fake_hub):
    snap = _snapshot(upcycled[0], tmp_path / "hub")
    assert all(p.is_symlink() for p in snap.iterdir())
    plain = dict(upload_files(upcycled[0]))
    assert dict(upload_files(snap)) == plain and sum(plain.values()) > 1_000_000  # names and target sizes
    note = [ln for ln in check_folder(snap).lines() if "links" in ln]
    assert note and f"{len(plain)} of {len(plain)} files are links" in note[0]
    lines: list[str] = []
    push_folder(snap, "my-org/pico-moe", dry_run=True, echo=lines.append)
    assert any(ln.startswith(f"would upload {len(plain)} files, ") for ln in lines)
    assert push_folder(snap, "my-org/pico-moe", echo=lines.append) == "https://hub.example/my-org/pico-moe"
    assert {rel: len(b) for rel, b in fake_hub.items()} == plain
    assert all(fake_hub[rel] == (upcycled[0] / rel).read_bytes() for rel in plain)


def test_push_refuses_a_link_leaving_the_folder_and_the_cache(upcycled, tmp_path, fake_hub):
    snap = _snapshot(upcycled[0], tmp_path / "hub")
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    (snap / "LICENSE").symlink_to(secret)
    for run in (lambda: check_folder(snap), lambda: push_folder(snap, "my-org/x", echo=lambda s: None)):
        with pytest.raises(MoemergeError, match=r"the link .*LICENSE names 'LICENSE', which resolves to "
                                                r".*secret\.txt, outside .* and its Hub cache"):
            run()
    assert fake_hub == {}


def test_push_refuses_a_broken_link_and_a_folder_link(upcycled, tmp_path, fake_hub):
    d = tmp_path / "pub"
    shutil.copytree(upcycled[0], d)
    (d / "LICENSE.md").symlink_to(d / "gone.md")
    with pytest.raises(MoemergeError, match=r"LICENSE\.md is a broken link; restore its target or delete it"):
        push_folder(d, "my-org/x", dry_run=True, echo=lambda s: None)
    (d / "LICENSE.md").unlink()
    (tmp_path / "extras").mkdir()
    (d / "extras").symlink_to(tmp_path / "extras")
    with pytest.raises(MoemergeError, match=r"extras is a link to a folder, which push does not follow"):
        push_folder(d, "my-org/x", echo=lambda s: None)
    assert fake_hub == {}


def test_push_refuses_an_index_entry_it_would_not_upload(upcycled, tmp_path, fake_hub):
    d = tmp_path / "pub"
    shutil.copytree(upcycled[0], d)
    shard = _first_shard(d).name
    (d / "checkpoints").mkdir()
    (d / shard).rename(d / "checkpoints" / shard)
    _edit_json(d / "model.safetensors.index.json", lambda b: b["weight_map"].update(
        {k: f"checkpoints/{shard}" for k, v in b["weight_map"].items() if v == shard}))
    check_folder(d)  # a sound folder: the index names a file inside it ...
    for dry_run in (True, False):  # ... which push leaves out by default
        with pytest.raises(MoemergeError, match=rf"push: model.safetensors.index.json names 'checkpoints/{shard}', "
                                                r"which push would not upload \(push skips paths matching "
                                                r"'checkpoints'.*--include-checkpoints"):
            push_folder(d, "my-org/x", dry_run=dry_run, echo=lambda s: None)
    assert fake_hub == {}
    push_folder(d, "my-org/x", include_checkpoints=True, echo=lambda s: None)
    assert f"checkpoints/{shard}" in fake_hub


def test_push_refuses_an_index_entry_outside_the_folder(upcycled, tmp_path, fake_hub):
    d = tmp_path / "pub"
    shutil.copytree(upcycled[0], d)
    shard = _first_shard(d).name
    (d / shard).rename(tmp_path / shard)
    _edit_json(d / "model.safetensors.index.json", lambda b: b["weight_map"].update(
        {k: f"../{shard}" for k, v in b["weight_map"].items() if v == shard}))
    with pytest.raises(MoemergeError, match=rf"'\.\./{shard}', which is not a plain relative path"):
        push_folder(d, "my-org/x", dry_run=True, echo=lambda s: None)
    (d / shard).symlink_to(tmp_path / shard)  # a link out of the folder instead: refused as well
    _edit_json(d / "model.safetensors.index.json", lambda b: b["weight_map"].update(
        {k: shard for k, v in b["weight_map"].items() if v == f"../{shard}"}))
    with pytest.raises(MoemergeError, match=rf"'{shard}', which resolves to .*, outside"):
        push_folder(d, "my-org/x", echo=lambda s: None)
    assert fake_hub == {}


def test_push_offline_or_unreachable_is_one_line_fast_and_creates_nothing(upcycled, monkeypatch):
    """huggingface_hub's own offline mode and a closed port, in process: one line, in seconds, no request made."""
    from huggingface_hub import HfApi, constants

    before = sorted(p.relative_to(upcycled[0]) for p in upcycled[0].rglob("*"))
    created: list[str] = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: created.append("repo"))
    monkeypatch.setenv("HF_TOKEN", "hf_FakeTokenForAClosedPort1234")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MoemergeError, match="^push needs the network, but HF_HUB_OFFLINE is set; unset it"):
        push_folder(upcycled[0], "my-org/x", echo=lambda s: None)
    port = _closed_port()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 3)  # as HF_HUB_ETAG_TIMEOUT=3 would set it
    t0 = time.perf_counter()
    with pytest.raises(MoemergeError) as e:
        push_folder(upcycled[0], "my-org/x", echo=lambda s: None)
    elapsed = time.perf_counter() - t0
    msg = str(e.value)
    assert msg.startswith(f"push: cannot reach http://127.0.0.1:{port} (") and "\n" not in msg
    assert msg.endswith("run push again; nothing was sent") and "hf_Fake" not in msg
    assert elapsed < 5, f"took {elapsed:.1f}s (check included)"
    assert created == [] and sorted(p.relative_to(upcycled[0]) for p in upcycled[0].rglob("*")) == before
    from huggingface_hub import get_session

    assert get_session().timeout.connect == 3  # huggingface_hub's own setting bounds the connect


# ---- token masking in push errors ----------------------------------------------------------------
def test_clean_masks_the_env_token_and_token_looking_text(monkeypatch):
    from mergekit_lite.hub import _clean

    env_token = "my-own-token-format-0042"  # not hf_-shaped: only the HF_TOKEN replacement can mask it
    monkeypatch.setenv("HF_TOKEN", env_token)
    err = RuntimeError(f"401 Unauthorized: Bearer {env_token} / header hf_AbCdEfGh12345678 rejected\nsecond line")
    line = _clean(err)
    assert env_token not in line and "hf_AbCdEfGh12345678" not in line
    assert line == "401 Unauthorized: Bearer *** / header hf_*** rejected"  # first line only


def test_push_error_never_prints_the_token(upcycled, monkeypatch, capsys):
    from huggingface_hub import HfApi

    token = "hf_SecretTokenThatMustNotLeak9876"
    monkeypatch.setenv("HF_TOKEN", token)

    def leak(self, *a, **k):
        raise RuntimeError(f"request with Authorization: Bearer {token} failed (mirror said hf_OtherTokenX1234567)")

    monkeypatch.setattr(HfApi, "whoami", leak)
    with pytest.raises(MoemergeError) as e:
        push_folder(upcycled[0], "my-org/x", echo=print)
    printed = str(e.value) + capsys.readouterr().out
    assert token not in printed and "hf_OtherTokenX1234567" not in printed
    assert str(e.value) == ("push to my-org/x failed: request with Authorization: Bearer *** failed "
                            "(mirror said hf_***); nothing was committed")


# ---- check catches what loads but cannot run (issue 23) -------------------------------------------------------
def _edited(upcycled, tmp_path, edit) -> Path:
    d = tmp_path / "edited"
    shutil.copytree(upcycled[0], d)
    edit(d)
    return d


def test_check_refuses_top_k_above_the_expert_count(upcycled, tmp_path):
    d = _edited(upcycled, tmp_path, lambda d: _edit_json(d / "config.json",
                                                         lambda c: c.update(num_experts_per_tok=99)))
    with pytest.raises(MoemergeError, match=r"routes each token to 99 experts but layers hold \d+; set "
                                            r"num_experts_per_tok to at most"):
        check_folder(d)


def test_check_refuses_a_tokenizer_larger_than_the_embedding(upcycled, tmp_path):
    from transformers import AutoTokenizer

    def grow(d: Path) -> None:  # e.g. a chat tokenizer with extra tokens copied in, embeddings never resized
        tok = AutoTokenizer.from_pretrained(str(d))
        tok.add_tokens([f"<extra_{i}>" for i in range(100)])
        tok.save_pretrained(str(d))

    d = _edited(upcycled, tmp_path, grow)
    with pytest.raises(MoemergeError, match=r"the tokenizer in .* has \d+ tokens but the model embeds \d+ "):
        check_folder(d)


def test_check_refuses_a_weight_whose_dtype_was_relabelled(upcycled, tmp_path):
    def relabel(d: Path) -> None:  # F32 bytes declared as I32 in the shard header: same size, nonsense values
        shard = _first_shard(d)
        raw = shard.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        key = next(k for k in header if k.endswith("gate.weight"))
        header[key]["dtype"] = "I32"
        head = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        shard.write_bytes(raw[:8] + head + raw[8 + n:])

    d = _edited(upcycled, tmp_path, relabel)
    with pytest.raises(MoemergeError, match=r"gate\.weight' in .* is int32, not a floating-point weight"):
        check_folder(d)


def test_a_relative_local_source_never_becomes_a_hub_base_model(pico_llama, tmp_path, monkeypatch):
    """`models/dense` looks like a repo id; recorded relative, a card written from another directory named it."""
    import yaml

    from mergekit_lite.card import front_matter
    from mergekit_lite.io.sidefiles import read_sidecar

    (tmp_path / "models").mkdir()
    shutil.copytree(pico_llama, tmp_path / "models" / "dense")
    (tmp_path / "up.yaml").write_text(yaml.safe_dump({"source": "models/dense", "num_experts": 4,
                                                      "experts_per_token": 2}))
    monkeypatch.chdir(tmp_path)
    run_upcycle(Path("up.yaml"), Path("moe"), echo=lambda s: None)
    record = read_sidecar(tmp_path / "moe")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # e.g. `moemerge train` or `verify` run from another folder rewrites the card
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert "base_model" not in front_matter(record, config, None), record["lineage"]


def test_push_without_a_token_says_so_before_announcing_an_upload(upcycled, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    lines: list[str] = []
    with pytest.raises(MoemergeError, match=r"^push: not logged in .*nothing was sent$"):
        push_folder(upcycled[0], "my-org/pico-moe", echo=lines.append)
    assert not any(ln.startswith("uploading") for ln in lines), lines


def test_the_card_says_what_was_done_to_the_source_not_to_this_checkpoint():
    from mergekit_lite.card import _summary

    record = {"kind": "upcycle", "lineage": [{"step": "source", "model": "/work/dense-init"}, {"step": "train"},
                                             {"step": "upcycle"}]}
    text = _summary(record, {"architectures": ["MixtralForCausalLM"]})
    assert "A `MixtralForCausalLM` checkpoint made with" in text
    assert "Its source, `dense-init`, was trained further, then upcycled into a Mixture-of-Experts." in text
    assert "checkpoint trained further" not in text
