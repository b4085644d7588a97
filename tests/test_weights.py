"""Tests for stego_jax.weights against fixtures written by the real torch / safetensors libraries.

The fixtures come from tests/fixtures/make_torch_fixtures.py; downloads go to a loopback server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import re
import socket
import threading
import warnings
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from stego_jax.models.vit import ViTConfig, VisionTransformer
from stego_jax.weights import (
    REGISTRY,
    flatten_params,
    load_dino,
    load_safetensors,
    load_torch_checkpoint,
)
import stego_jax.weights as weights_pkg
from stego_jax.weights import download as dl
from stego_jax.weights.convert import convert_state_dict, random_dino_state_dict

FIX = Path(__file__).parent / "fixtures"
TINY_CFG = ViTConfig(
    patch_size=8, embed_dim=8, depth=2, num_heads=2, mlp_ratio=4.0, qkv_bias=True, img_size=32
)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    """fp32 values in the official DINO key layout, written by torch's .numpy()."""
    with np.load(FIX / "tiny_dino.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def ref_extra() -> dict[str, np.ndarray]:
    with np.load(FIX / "tiny_dino_ref.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def tiny() -> tuple[ViTConfig, dict]:
    return load_dino(FIX / "tiny_dino_fp32.pth", num_heads=2)


def _assert_trees_equal(a: dict, b: dict) -> None:
    fa, fb = flatten_params(a), flatten_params(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == np.float32 and fb[k].dtype == np.float32, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# ------------------------------------------------------------------------------------------------
# Torch-free checkpoint reading


@pytest.mark.parametrize("name", ["tiny_dino_fp32", "tiny_dino_noncontig", "tiny_dino_legacy"])
def test_torch_checkpoint_values_exact(name: str, ref: dict) -> None:
    sd = load_torch_checkpoint(FIX / f"{name}.pth")
    assert sorted(sd) == sorted(ref)
    for k, v in ref.items():
        assert sd[k].dtype == np.float32 and sd[k].shape == v.shape, k
        np.testing.assert_array_equal(sd[k], v, err_msg=k)
        assert sd[k].flags.c_contiguous  # strided storages come back as plain arrays


def test_torch_checkpoint_half_precision(ref_extra: dict) -> None:
    sd = load_torch_checkpoint(FIX / "tiny_dino_half.pth")
    n_fp16 = n_bf16 = 0
    for k, v in sd.items():
        if "fp16/" + k in ref_extra:
            assert v.dtype == np.float16, k
            np.testing.assert_array_equal(v, ref_extra["fp16/" + k], err_msg=k)
            n_fp16 += 1
        else:
            assert v.dtype == ml_dtypes.bfloat16, k
            np.testing.assert_array_equal(v.view(np.uint16), ref_extra["bf16bits/" + k], err_msg=k)
            n_bf16 += 1
    assert n_fp16 > 0 and n_bf16 > 0


def test_training_checkpoint_unpickles_args_and_both_models() -> None:
    ck = load_torch_checkpoint(FIX / "tiny_dino_train_ckpt.pth")
    assert ck["epoch"] == 3 and ck["args"].arch == "vit_small" and ck["args"].patch_size == 8
    assert "module.backbone.cls_token" in ck["student"] and "head.mlp.0.weight" in ck["teacher"]


@pytest.mark.parametrize(
    "name, callee",
    [("malicious_os_system", "system"), ("malicious_exec", "exec"), ("malicious_legacy", "system")],
)
def test_malicious_checkpoint_refused(name: str, callee: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the payloads write their marker into the working directory
    with pytest.raises(
        ValueError, match=rf"wants to call \w+\.{callee}, which is not allowed; refusing"
    ):
        load_torch_checkpoint(FIX / f"{name}.pth")
    with pytest.raises(ValueError, match="not allowed"):
        load_dino(FIX / f"{name}.pth", num_heads=2)
    assert not (tmp_path / "stego_jax_pwned_marker").exists()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"\x00\x01not a pickle at all" * 10)
    with pytest.raises(ValueError, match=str(bad)):
        load_torch_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_torch_checkpoint(tmp_path / "nope.pth")


def test_truncated_zip_storage_reported(tmp_path: Path) -> None:
    import zipfile

    src, dst = FIX / "tiny_dino_fp32.pth", tmp_path / "cut.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data[:-4] if info.filename.endswith("/data/0") else data)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_torch_checkpoint(dst)


def test_safetensors_reader_dtypes_and_corruption(tmp_path: Path) -> None:
    sd = load_safetensors(FIX / "tiny_hf_vit.safetensors")
    assert sd["embeddings.position_embeddings"].shape == (1, 17, 8)
    assert all(v.dtype == np.float32 for v in sd.values())
    blob = (FIX / "tiny_hf_vit.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_safetensors(cut)


# ------------------------------------------------------------------------------------------------
# Conversion


def test_conversion_values_and_config(tiny: tuple, ref: dict) -> None:
    cfg, p = tiny
    assert cfg == TINY_CFG
    # The layout, stated independently: Linear [out, in] -> kernel [in, out], conv OIHW -> HWIO.
    np.testing.assert_array_equal(
        p["patch_embed"]["kernel"], ref["patch_embed.proj.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(p["patch_embed"]["bias"], ref["patch_embed.proj.bias"])
    np.testing.assert_array_equal(p["cls_token"], ref["cls_token"])
    np.testing.assert_array_equal(p["pos_embed"], ref["pos_embed"])
    np.testing.assert_array_equal(p["norm"]["scale"], ref["norm.weight"])
    np.testing.assert_array_equal(p["norm"]["bias"], ref["norm.bias"])
    for i in range(2):
        blk, t = p[f"blocks_{i}"], f"blocks.{i}."
        for sub, name in [("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2")]:
            np.testing.assert_array_equal(
                blk[sub][name]["kernel"], ref[f"{t}{sub}.{name}.weight"].T
            )
            np.testing.assert_array_equal(blk[sub][name]["bias"], ref[f"{t}{sub}.{name}.bias"])
        for n in ("norm1", "norm2"):
            np.testing.assert_array_equal(blk[n]["scale"], ref[f"{t}{n}.weight"])
            np.testing.assert_array_equal(blk[n]["bias"], ref[f"{t}{n}.bias"])
    n_leaves = len(flatten_params(p))
    assert n_leaves == len(ref)


def test_converted_tree_matches_model_init(tiny: tuple) -> None:
    cfg, p = tiny
    init = jax.eval_shape(
        VisionTransformer(cfg).init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)
    )
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), init["params"])
    assert jax.tree.structure(shapes) == jax.tree.structure(
        jax.tree.map(lambda a: (a.shape, a.dtype), p)
    )
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), p)


def test_forward_matches_torch_reference(tiny: tuple, ref_extra: dict) -> None:
    cfg, p = tiny
    x = np.sin(np.arange(32 * 32 * 3, dtype=np.float32) * 0.37).reshape(1, 32, 32, 3)
    out = np.asarray(VisionTransformer(cfg).apply({"params": p}, x))
    assert out.shape == (1, 17, 8) and np.isfinite(out).all()
    np.testing.assert_allclose(out, ref_extra["forward/tokens"], rtol=1e-5, atol=1e-5)


def test_training_checkpoint_loads_teacher(tiny: tuple) -> None:
    cfg, p = load_dino(FIX / "tiny_dino_train_ckpt.pth", num_heads=2)
    assert cfg == tiny[0]
    _assert_trees_equal(p, tiny[1])  # student (= teacher + 100) and head keys ignored


def test_all_layouts_and_formats_agree(tiny: tuple, tmp_path: Path) -> None:
    for f in (
        "tiny_dino.npz",
        "tiny_hf_vit.safetensors",
        "tiny_dino_noncontig.pth",
        "tiny_dino_legacy.pth",
    ):
        cfg, p = load_dino(FIX / f, num_heads=2)
        assert cfg == tiny[0], f
        _assert_trees_equal(p, tiny[1])
    # Flat 'a/b/c' Flax export round-trips, with and without an HF-style prefix-free layout.
    np.savez(tmp_path / "flax.npz", **flatten_params(tiny[1]))
    cfg, p = load_dino(tmp_path / "flax.npz", num_heads=2)
    assert cfg == tiny[0]
    _assert_trees_equal(p, tiny[1])
    # Half precision is widened to float32 exactly.
    cfg, p = load_dino(FIX / "tiny_dino_half.pth", num_heads=2)
    half = load_torch_checkpoint(FIX / "tiny_dino_half.pth")
    np.testing.assert_array_equal(
        p["blocks_1"]["mlp"]["fc1"]["kernel"], half["blocks.1.mlp.fc1.weight"].astype(np.float32).T
    )


def test_shape_and_key_errors(ref: dict) -> None:
    def convert(sd, **kw):
        return convert_state_dict(sd, "ckpt.pth", **kw)

    bad = dict(ref, **{"blocks.1.mlp.fc2.weight": np.zeros((8, 31), np.float32)})
    with pytest.raises(
        ValueError, match=re.escape("'blocks.1.mlp.fc2.weight' has shape [8, 31], expected [8, 32]")
    ):
        convert(bad, num_heads=2)
    missing = {k: v for k, v in ref.items() if k != "blocks.0.attn.proj.bias"}
    with pytest.raises(
        ValueError, match=re.escape("'blocks.0.attn.proj.bias' is missing (expected shape [8])")
    ):
        convert(missing, num_heads=2)
    extra = dict(ref, **{"blocks.0.ls1.gamma": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="unexpected key 'blocks.0.ls1.gamma' with shape \\[8\\]"):
        convert(extra, num_heads=2)
    with pytest.raises(ValueError, match="pass num_heads="):
        convert(ref)
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        convert(ref, num_heads=3)
    with pytest.raises(ValueError, match="'patch_embed.proj.weight' is missing"):
        convert({"foo": np.zeros(3, np.float32)})
    # timm/DINO head keys and DDP/MultiCrop prefixes are accepted.
    wrapped = {"module.backbone." + k: v for k, v in ref.items()} | {
        "head.weight": np.zeros((5, 8), np.float32)
    }
    assert convert(wrapped, num_heads=2)[0] == TINY_CFG


def test_default_heads_follow_dino_head_dim() -> None:
    from stego_jax.weights.convert import expected_dino_shapes, infer_config

    for d, heads in ((192, 3), (384, 6), (768, 12)):
        cfg = ViTConfig(patch_size=16, embed_dim=d, depth=1, num_heads=heads)
        sd = {k: np.zeros(s, np.float32) for k, s in expected_dino_shapes(cfg).items()}
        assert infer_config(sd, "x") == cfg  # img_size 224 from 197 pos_embed rows


# ------------------------------------------------------------------------------------------------
# Download (loopback HTTP server)


class _Server:
    """Serves bytes on 127.0.0.1 with Range support.

    Can drop the next response halfway (`drop_next`) or ignore Range headers (`ignore_range`).
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.log = files, []
        self.drop_next = False
        self.ignore_range = False
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                outer.log.append((self.path, rng))
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and not outer.ignore_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.drop_next:
                    outer.drop_next = False
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = (
                        True  # the socket closes with half the promised bytes sent
                    )
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    blob = (FIX / "tiny_dino_fp32.pth").read_bytes()
    s = _Server({"/w/tiny.pth": blob, "/" + REGISTRY["dino_vits8"].path: blob})
    yield s, blob
    s.close()


def test_download_complete(server, tmp_path: Path) -> None:
    srv, blob = server
    dest = dl.fetch(srv.base + "/w/tiny.pth", tmp_path / "c" / "tiny.pth", progress=True)
    assert dest.read_bytes() == blob
    assert (tmp_path / "c" / "tiny.pth.sha256").read_text().split()[0] == hashlib.sha256(
        blob
    ).hexdigest()
    assert srv.log == [("/w/tiny.pth", None)]
    assert not (tmp_path / "c" / "tiny.pth.part").exists()
    dl.fetch(srv.base + "/w/tiny.pth", dest, progress=False)  # cached: verified, not fetched again
    assert len(srv.log) == 1


def test_download_interrupted_then_resumed(server, tmp_path: Path) -> None:
    srv, blob = server
    srv.drop_next = True
    dest = dl.fetch(
        srv.base + "/w/tiny.pth", tmp_path / "tiny.pth", progress=False, retries=2, backoff=0.0
    )
    assert len(srv.log) == 2
    assert srv.log[0][1] is None
    assert srv.log[1][1] == f"bytes={len(blob) // 2}-"
    assert dest.read_bytes() == blob


def test_download_restarts_when_range_ignored(server, tmp_path: Path) -> None:
    srv, blob = server
    srv.ignore_range = True
    (tmp_path / "tiny.pth.part").write_bytes(b"stale bytes from some other file")
    dest = dl.fetch(srv.base + "/w/tiny.pth", tmp_path / "tiny.pth", progress=False, retries=0)
    assert srv.log[0][1] == "bytes=32-"
    assert dest.read_bytes() == blob


def test_corrupted_cache_detected(server, tmp_path: Path) -> None:
    srv, blob = server
    dest = dl.fetch(srv.base + "/w/tiny.pth", tmp_path / "tiny.pth", progress=False)
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0xFF
    dest.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=rf"{re.escape(str(dest))} are corrupt.*Delete"):
        dl.fetch(srv.base + "/w/tiny.pth", dest, progress=False)


def test_pinned_checksum_mismatch(server, tmp_path: Path) -> None:
    srv, _ = server
    with pytest.raises(ValueError, match="expected 0000"):
        dl.fetch(srv.base + "/w/tiny.pth", tmp_path / "tiny.pth", sha256="0" * 64, progress=False)
    assert not (tmp_path / "tiny.pth").exists() and not (tmp_path / "tiny.pth.part").exists()


def test_server_down_message(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/dino/x.pth"
    dest = tmp_path / "cache" / "x.pth"
    with pytest.raises(FileNotFoundError) as e:
        dl.fetch(url, dest, progress=False, retries=1, backoff=0.0)
    msg = str(e.value)
    assert url in msg and str(dest) in msg and "offline" in msg


def test_not_found_is_not_retried(server, tmp_path: Path) -> None:
    srv, _ = server
    with pytest.raises(FileNotFoundError, match="HTTPError"):
        dl.fetch(
            srv.base + "/w/missing.pth", tmp_path / "m.pth", progress=False, retries=3, backoff=5.0
        )
    assert len(srv.log) == 1


def test_load_dino_registry_via_loopback(server, tmp_path: Path, monkeypatch, tiny: tuple) -> None:
    srv, blob = server
    monkeypatch.setenv("STEGO_JAX_WEIGHTS_URL", srv.base)
    monkeypatch.setenv("STEGO_JAX_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "dino_deitsmall8_pretrain.pth"
    # The served file is the tiny ViT, not a ViT-S/8: the registry's architecture check says so.
    with pytest.raises(ValueError, match=r"expected \(8, 384, 12\).*Delete it"):
        load_dino("dino_vits8", progress=False)
    assert cached.read_bytes() == blob
    # With the registry entry describing the tiny ViT, the same path returns its params.
    spec = dataclasses.replace(REGISTRY["dino_vits8"], embed_dim=8, depth=2, num_heads=2)
    monkeypatch.setitem(REGISTRY, "dino_vits8", spec)
    cfg, p = load_dino("dino_vits8", progress=False)
    assert cfg == tiny[0]
    _assert_trees_equal(p, tiny[1])
    assert srv.log == [("/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth", None)]
    # An explicit cache_dir and base_url win over the environment.
    load_dino("dino_vits8", cache_dir=tmp_path / "other", base_url=srv.base + "/", progress=False)
    assert (tmp_path / "other" / "dino_deitsmall8_pretrain.pth").read_bytes() == blob


def test_registry_urls_and_defaults(monkeypatch, tmp_path: Path) -> None:
    base = "https://dl.fbaipublicfiles.com/dino/"
    want = {
        "dino_vits16": "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
        "dino_vits8": "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
        "dino_vits8_300ep": "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
        "dino_vitb16": "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
        "dino_vitb8": "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    }
    from stego_jax.weights import resolve_base_url

    monkeypatch.delenv("STEGO_JAX_WEIGHTS_URL", raising=False)
    assert {n: s.url(resolve_base_url()) for n, s in REGISTRY.items()} == {
        n: base + p for n, p in want.items()
    }
    monkeypatch.delenv("STEGO_JAX_CACHE", raising=False)
    assert dl.default_cache_dir() == Path.home() / ".cache" / "stego_jax" / "weights"
    with pytest.raises(FileNotFoundError, match="neither a registry name"):
        load_dino("dino_vits99")


# ------------------------------------------------------------------------------------------------
# Published checksums


def test_registry_pins_are_well_formed() -> None:
    for spec in REGISTRY.values():
        assert spec.sha256 is None or (
            re.fullmatch(r"[0-9a-f]{64}", spec.sha256) and spec.sha256_source
        ), spec.name
    with pytest.raises(ValueError, match="64 lowercase hex"):
        dataclasses.replace(REGISTRY["dino_vits8"], sha256="abc", sha256_source="somewhere")
    with pytest.raises(ValueError, match="sha256_source"):
        dataclasses.replace(REGISTRY["dino_vits8"], sha256="0" * 64)


def _tiny_spec(**kw):
    return dataclasses.replace(REGISTRY["dino_vits8"], embed_dim=8, depth=2, num_heads=2, **kw)


def test_pinned_registry_entry_checked_on_every_load(server, tmp_path: Path, monkeypatch) -> None:
    srv, blob = server
    digest = hashlib.sha256(blob).hexdigest()
    spec = _tiny_spec(sha256=digest, sha256_source="the test server")
    monkeypatch.setitem(REGISTRY, "dino_vits8", spec)
    cache = tmp_path / "cache"
    cache.mkdir()
    dest, record = cache / spec.filename, cache / (spec.filename + ".sha256")
    url = spec.url(srv.base)
    # A wrong file placed by hand, even one a record from an earlier load vouches for: refused.
    wrong = bytearray(blob)
    wrong[len(blob) // 3] ^= 0x01
    dest.write_bytes(bytes(wrong))
    record.write_text(f"{hashlib.sha256(wrong).hexdigest()}  {spec.filename}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pinned entry gives no "unpinned" warning
        with pytest.raises(ValueError) as e:
            load_dino("dino_vits8", cache_dir=cache, base_url=srv.base, progress=False)
    msg = str(e.value)
    for part in (str(dest), digest, hashlib.sha256(wrong).hexdigest(), url, "Delete"):
        assert part in msg, part
    # The right file placed by hand over that stale record: accepted, the record corrected.
    dest.write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dino("dino_vits8", cache_dir=cache, base_url=srv.base, progress=False)
    assert record.read_text().split()[0] == digest
    assert srv.log == []  # nothing was downloaded
    # Downloaded: checked against the pin too.
    dest.unlink()
    load_dino("dino_vits8", cache_dir=cache, base_url=srv.base, progress=False)
    assert dest.read_bytes() == blob and len(srv.log) == 1


def test_unpinned_registry_entry_warns_once(server, tmp_path: Path, monkeypatch) -> None:
    srv, _ = server
    monkeypatch.setattr(weights_pkg, "_UNPINNED_WARNED", set())
    monkeypatch.setitem(REGISTRY, "dino_vits8", _tiny_spec())
    with pytest.warns(UserWarning) as rec:
        for _ in range(2):
            load_dino("dino_vits8", cache_dir=tmp_path, base_url=srv.base, progress=False)
    msgs = [str(w.message) for w in rec if "SHA-256" in str(w.message)]
    assert len(msgs) == 1
    assert "no published SHA-256 is pinned" in msgs[0] and "first file" in msgs[0]
    assert str(tmp_path / "dino_deitsmall8_pretrain.pth.sha256") in msgs[0]


@pytest.mark.parametrize("cfg", [ViTConfig(patch_size=8, embed_dim=384, depth=12, num_heads=6),
                                 ViTConfig(patch_size=8, embed_dim=64, depth=1, num_heads=1, img_size=32)])
def test_random_dino_state_dict_is_a_dino_checkpoint_of_its_shapes(cfg):
    """The random checkpoint of the benchmarks and the offline script tests loads as the DINO ViT
    it stands for: same architecture read back off its shapes, LayerNorms the identity, the other
    weights drawn with the given scale, reproducibly."""
    sd = random_dino_state_dict(cfg, scale=0.05, seed=3)
    got, params = convert_state_dict(sd, "random", num_heads=cfg.num_heads)
    assert got == cfg
    assert sum(v.size for v in sd.values()) == sum(np.asarray(x).size for x in jax.tree_util.tree_leaves(params))
    assert np.all(sd["norm.weight"] == 1) and np.all(sd["blocks.0.norm2.bias"] == 0)
    w = sd["blocks.0.mlp.fc1.weight"]
    assert w.dtype == np.float32 and abs(w.std() - 0.05) < 0.005 and abs(w.mean()) < 0.005
    again = random_dino_state_dict(cfg, scale=0.05, seed=3)
    assert all(np.array_equal(sd[k], again[k]) for k in sd)
    assert not np.array_equal(sd["cls_token"], random_dino_state_dict(cfg, scale=0.05, seed=4)["cls_token"])
