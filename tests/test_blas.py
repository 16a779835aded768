"""The gemv shim under MLX's CPU matmul gives the same products as numpy, for every layout it reroutes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mlxserve import blas

SHIM_READY = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("cc") is None
    or not any(Path(p).exists() for p in blas._CANDIDATES) or "off" in (os.environ.get("MLXSERVE_BLAS"),
                                                                         os.environ.get("MLXSERVE_BLAS_SHIM")),
    reason="the shim is for Linux with OpenBLAS and a C compiler, and on unless MLXSERVE_BLAS(_SHIM)=off")

SCRIPT = textwrap.dedent("""
    import json, sys
    from mlxserve import blas
    blas.preload_openblas()
    import mlx.core as mx, numpy as np
    results = {"shim": str(blas.gemv_shim), "errors": []}
    for rows in (1, 2, 3):
        for transpose_b in (False, True):
            for transpose_a in (False, True):
                a = mx.random.normal((576, rows)).T if transpose_a else mx.random.normal((rows, 576))
                b = mx.random.normal((300, 576)) if transpose_b else mx.random.normal((576, 300))
                got = np.array(a @ (b.T if transpose_b else b))
                want = np.array(a).astype(np.float64) @ np.array(b.T if transpose_b else b).astype(np.float64)
                results["errors"].append(float(np.abs(got - want).max()))
    print(json.dumps(results))
""")


@SHIM_READY
def test_the_shim_is_in_front_of_openblas_and_exact(tmp_path: Path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True).stdout
    results = json.loads(out)
    assert results["shim"].startswith(str(tmp_path))  # built into the user's cache
    assert max(results["errors"]) < 1e-3


QUANTIZED_SCRIPT = textwrap.dedent("""
    import gc, json, re, sys
    from mlxserve import blas
    blas.preload_openblas()
    import mlx.core as mx, mlx.nn as nn, numpy as np
    from mlxserve.engine import cpu

    def shim_product(x, weight, scales, biases, group, bits):
        \"\"\"What the shim computes, in float64: x rounded to 16 bits per block of 32 as the shim rounds it
        (float32 arithmetic, ties to even), by the weights, summed exactly.\"\"\"
        x = np.asarray(x, dtype=np.float32)
        m, k = x.shape
        raw = np.asarray(weight).view(np.uint8)
        values = np.stack([raw & 15, raw >> 4], -1).reshape(raw.shape[0], -1) if bits == 4 else raw
        blocks = x.reshape(m, k // 32, 32)
        largest = np.abs(blocks).max(-1)
        top = np.float32(32767)
        inverse = np.where(largest > 0, top / np.maximum(largest, np.float32(1e-30)), np.float32(0))
        rounded = np.rint(blocks * inverse.astype(np.float32)[..., None])
        near = (rounded * (largest / top).astype(np.float64)[..., None]).reshape(m, k)
        w = np.repeat(np.asarray(scales, np.float64), group, 1) * values + np.repeat(np.asarray(biases, np.float64), group, 1)
        return near @ w.T

    results = {"cases": []}
    for bits, group, half in ((4, 32, False), (8, 32, False), (4, 64, False), (4, 32, True)):
        model = nn.Module()
        model.proj = nn.QuantizedLinear.from_linear(nn.Linear(576, 300), group_size=group, bits=bits)
        model.embed = nn.QuantizedEmbedding.from_embedding(nn.Embedding(200, 576), group_size=group, bits=bits)
        if half:  # scales and biases stored in float16, as a model's on disk usually are
            for m in (model.proj, model.embed):
                m.scales, m.biases = m.scales.astype(mx.float16), m.biases.astype(mx.float16)
        dense = {name: np.array(mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32),
                                              group, bits), dtype=np.float64)
                 for name, m in (("proj", model.proj), ("embed", model.embed))}
        raw = {name: (np.array(m.weight), np.array(m.scales), np.array(m.biases), group, bits)
               for name, m in (("proj", model.proj), ("embed", model.embed))}
        cpu.optimize_for_cpu(model)
        case = {"bits": bits, "group": group, "half": half, "registered": blas.registered(), "errors": [],
                "products": [], "float_errors": [], "copy": blas.quantized_bytes(),
                "placeholders": cpu.placeholder_bytes(), "lookup": float(np.abs(np.array(
                    model.embed(mx.array([[3, 199]]))) - dense["embed"][[3, 199]]).max())}
        shapes = ((1, 576), (2, 576), ("T", 2), (3, 576), (2, 5, 576), (70, 576), ("slice", 9), ("T", 300))
        for shape in shapes:
            if shape[0] == "T":  # a transposed input
                x = mx.random.normal((576, shape[1])).T
            elif shape[0] == "slice":  # rows of a bigger array, not contiguous
                x = mx.random.normal((shape[1], 2 * 576))[:, ::2]
            else:
                x = mx.random.normal(shape)
            for name, layer in (("proj", lambda v: model.proj(v)), ("embed", lambda v: model.embed.as_linear(v))):
                before = blas.quantized_products()
                got = np.array(layer(x))
                case["products"].append(blas.quantized_products() - before)
                bias = np.array(model.proj.bias) if name == "proj" else 0
                want = shim_product(np.array(x).reshape(-1, 576), *raw[name]).reshape(got.shape) + bias
                case["errors"].append(float(np.abs(got - want).max() / np.abs(want).max()))
                want = np.array(x).astype(np.float64) @ dense[name].T + bias
                case["float_errors"].append(float(np.abs(got - want).max() / np.abs(want).max()))
        x = mx.random.normal((4, 576))  # a view of the weight's first rows: the same address, fewer rows
        first = np.array(x @ model.proj._placeholder[:100].T)
        want = shim_product(np.array(x), *raw["proj"])[:, :100]
        case["first_rows"] = float(np.abs(first - want).max() / np.abs(want).max())
        x = mx.random.normal((1, 576))
        mx.eval(x)
        mx.export_to_dot(f"{sys.argv[1]}/graph.dot", model.embed.as_linear(x))
        case["graph"] = sorted(re.findall(r'label ?= ?"(\\w+)"', open(f"{sys.argv[1]}/graph.dot").read()))
        x = mx.random.normal((11, 576))
        together = np.array(model.proj(x))
        case["same_alone"] = all(np.array_equal(np.array(model.proj(x[i:i + n])), together[i:i + n])
                                 for n in (1, 2, 3, 8) for i in range(0, 11 - n + 1))
        del model
        gc.collect()
        case["registered_after"] = blas.registered()
        case["copy_after"] = blas.quantized_bytes()
        case["placeholders_after"] = cpu.placeholder_bytes()
        results["cases"].append(case)
    many = nn.Module()  # more layers than the registry's first allocation holds
    many.layers = [nn.QuantizedLinear.from_linear(nn.Linear(64, 32), group_size=32, bits=4) for _ in range(300)]
    raw = [(np.array(m.weight), np.array(m.scales), np.array(m.biases), 32, 4) for m in many.layers]
    cpu.optimize_for_cpu(many)
    x = mx.random.normal((1, 64))
    results["many"] = {"registered": blas.registered(),
                       "error": max(float(np.abs(np.array(layer(x)) - (shim_product(np.array(x), *w) + np.array(layer.bias))).max())
                                    for layer, w in zip(many.layers, raw))}
    def resident():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    big = nn.Module()  # 64 MB of 4-bit weights with their scales and biases
    big.layers = [nn.QuantizedLinear.from_linear(nn.Linear(4096, 4096), group_size=32, bits=4) for _ in range(8)]
    mx.eval(big.parameters())
    held, before = sum(a.nbytes for a in (big.layers[0].weight, big.layers[0].scales, big.layers[0].biases)) * 8, resident()
    cpu.optimize_for_cpu(big)
    results["growth"] = (resident() - before) / held
    print(json.dumps(results))
""")


@SHIM_READY
def test_products_from_quantized_bytes_are_exact_for_any_rows_and_the_same_alone_until_the_model_goes(tmp_path: Path):
    """4- and 8-bit layers (and a quantized embedding used as the output layer) multiply any number of
    rows from their quantized bytes, one product per call, whatever the input's layout (a transposed one
    of more rows than the shim copies at once included), and by a view of the weight's first rows (which
    multiplied by the placeholder's zeros before), each one MLX operation; a row's outputs
    are bit-for-bit the same alone or among others; and when the model is collected its weights leave
    the registry and their placeholders are gone."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", QUANTIZED_SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                         check=True).stdout
    results = json.loads(out)
    assert results["many"]["registered"] == 300 and results["many"]["error"] < 1e-5
    assert results["growth"] < 0.25, results  # the shim's copy in, the layers' own arrays handed back
    for case in results["cases"]:
        assert case["registered"] == 2 and case["placeholders"] == (300 + 200) * 576 * 4, case
        assert case["products"] == [1] * 16, case
        assert max(case["errors"]) < 1e-5 and case["lookup"] < 1e-6 and case["first_rows"] < 1e-5, case
        assert max(case["float_errors"]) < 1e-4, case  # float32's products but for the input's rounding
        assert case["same_alone"], case
        assert case["graph"] == ["Matmul"], case  # a product is one MLX operation: no transpose made per call
        assert case["registered_after"] == 0 and case["placeholders_after"] == 0 and case["copy_after"] == 0, case
        # The shim's copy: panels of eight rows (38 and 25 here), per group the values and the eight
        # scales and biases, float16 when they all are exactly
        per_group = case["bits"] * case["group"] + (32 if case["half"] else 64)
        assert case["copy"] == (38 + 25) * (576 // case["group"]) * per_group, case


PORTABLE_DRIVER = r"""
#include SHIM
int main(void) {
  /* One weight per case (4- and 8-bit, groups of 32 and 64, rows past the last full panel), random
   * bytes; products of 1 and 5 rows and attention-shaped ones, printed to compare builds. */
  const int cases[5][4] = {{4, 32, 300, 0}, {8, 32, 301, 0}, {4, 64, 77, 0}, {8, 64, 9, 0}, {4, 32, 50, 1}};
  const int k = 256;
  srand(7);
  float *x = malloc(sizeof(float) * 5 * k), *y = malloc(sizeof(float) * 5 * 301);
  for (int i = 0; i < 5 * k; i++) x[i] = (rand() % 20001 - 10000) * 1e-4f * (i % 37 == 0 ? 50.f : 1.f);
  for (int c = 0; c < 5; c++) {
    const int bits = cases[c][0], group = cases[c][1], n = cases[c][2], half = cases[c][3];
    uint8_t *q = malloc((size_t)n * k * bits / 8);
    float *s = malloc(sizeof(float) * n * (k / group)), *b = malloc(sizeof(float) * n * (k / group));
    for (long i = 0; i < (long)n * k * bits / 8; i++) q[i] = rand();
    for (long i = 0; i < (long)n * (k / group); i++) { /* float16's exactly, or not */
      s[i] = half ? (rand() % 1000 + 1) / 8192.f : (rand() % 1000 + 1) * 1e-4f;
      b[i] = half ? -(rand() % 1000) / 256.f : -(rand() % 1000) * 1e-3f;
    }
    float *dense = malloc(64);
    const long before = mlxserve_quantized_bytes();
    if (mlxserve_register_quantized(dense, n, k, group, bits, q, s, b) != 0) return 1;
    if (mlxserve_quantized_bytes() - before != (n + 7) / 8 * (k / group) * (bits * group + (half ? 32 : 64))) return 2;
    for (int rows = 1; rows <= 5; rows += 4) {
      cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, rows, n, k, 1.f, x, k, dense, k, 0.f, y, n);
      for (int i = 0; i < rows * n; i++) printf("%.9g\n", y[i]);
    }
  }
  float *keys = malloc(sizeof(float) * 40 * 64);
  for (int i = 0; i < 40 * 64; i++) keys[i] = (rand() % 2001 - 1000) * 1e-3f;
  cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, 5, 40, 64, 1.f, x, k, keys, 64, 0.f, y, 40); /* queries by keys */
  for (int i = 0; i < 5 * 40; i++) printf("%.9g\n", y[i]);
  cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, 5, 64, 40, 1.f, x, k, keys, 64, 0.f, y, 64); /* weights by values */
  for (int i = 0; i < 5 * 64; i++) printf("%.9g\n", y[i]);
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None or "avx2" not in blas._cpu_flags().split(),
                    reason="compares the AVX2 kernels with the portable ones: needs a C compiler and AVX2")
def test_the_portable_kernels_compute_what_the_avx2_ones_do(tmp_path: Path):
    """Where there is no AVX2 (an ARM Linux machine), the shim's plain C loops run instead: built for a
    generic x86-64, they give the AVX2 build's products (both sum exact integers; only a multiply-add's
    rounding may differ), for 4- and 8-bit weights, float16 and float32 scales, a ragged last panel,
    and attention's shapes."""
    driver = tmp_path / "driver.c"
    driver.write_text(PORTABLE_DRIVER)
    source = Path(blas.__file__).with_name("gemv_shim.c")
    outputs = []
    for flags in (["-O3", "-march=native"], ["-O2", "-march=x86-64", "-mno-avx", "-mno-fma"]):
        binary = tmp_path / flags[1].removeprefix("-march=")
        subprocess.run(["cc", *flags, f'-DSHIM="{source}"', str(driver), "-o", str(binary), "-ldl", "-lpthread",
                        "-lm"], check=True)
        outputs.append([float(v) for v in subprocess.run([str(binary)], capture_output=True, text=True,
                                                         check=True).stdout.split()])
    native, portable = (np.array(o) for o in outputs)
    assert native.shape == portable.shape and native.size > 2000
    assert np.abs(native - portable).max() <= 1e-5 * np.abs(native).max(), np.abs(native - portable).max()


ATTENTION_SCRIPT = textwrap.dedent("""
    import json
    from mlxserve import blas
    blas.preload_openblas()
    import mlx.core as mx, numpy as np
    results = {"errors": [], "same": []}
    before = blas.attention_products()
    keys, values = mx.random.normal((300, 64)), mx.random.normal((300, 70))
    queries = mx.random.normal((60, 64))
    for m in (1, 3, 60):
        for n in (5, 20, 27, 300):
            got = np.array(queries[:m] @ keys[:n].T)
            want = np.array(queries[:m]).astype(np.float64) @ np.array(keys[:n]).T.astype(np.float64)
            results["errors"].append(float(np.abs(got - want).max() / np.abs(want).max()))
            probs = mx.softmax(queries[:m] @ keys[:n].T, axis=-1)
            got = np.array(probs @ values[:n])
            want = np.array(probs).astype(np.float64) @ np.array(values[:n]).astype(np.float64)
            results["errors"].append(float(np.abs(got - want).max() / np.abs(want).max()))
    wider = queries @ keys[:34].T  # a row alone, and among 60 rows with 7 more keys in front
    results["same"].append(all(mx.array_equal(queries[i:i + 1] @ keys[7:34].T, wider[i:i + 1, 7:]).item()
                               for i in range(0, 60, 7)))
    probs = mx.softmax(queries @ keys[:27].T, axis=-1)  # left padding: zero probabilities first, any values
    mixed = mx.concatenate([mx.zeros((60, 7)), probs], axis=1) @ mx.concatenate([mx.random.normal((7, 70)),
                                                                                 values[:27]])
    results["same"].append(all(mx.array_equal(probs[i:i + 1] @ values[:27], mixed[i:i + 1]).item()
                               for i in range(0, 60, 7)))
    q, k = mx.random.normal((2, 3, 5, 64)), mx.random.normal((2, 3, 64, 9))  # attention's batched layout
    results["same"].append(mx.array_equal((q @ k)[1, 2], q[1, 2] @ k[1, 2]).item())
    c = mx.random.normal((3, 70))
    got = np.array(mx.addmm(c, probs[:3], values[:27], alpha=0.5, beta=2.0))
    want = 0.5 * np.array(probs[:3]).astype(np.float64) @ np.array(values[:27]).astype(np.float64) + 2 * np.array(c)
    results["errors"].append(float(np.abs(got - want).max() / np.abs(want).max()))
    results["products"] = blas.attention_products() - before
    print(json.dumps(results))
""")


@SHIM_READY
def test_attention_products_are_exact_and_sum_each_row_the_same_whatever_the_batch(tmp_path: Path):
    """Products with a side of at most 256 (attention's: queries by keys, probabilities by values) are
    the shim's: exact, and a row's outputs are bit-for-bit the same alone as among 60 rows, with more
    keys, and behind zero-probability padding (OpenBLAS picks kernels by shape, which rounded them
    differently, so a request's text alone and in a batch could part at a near tie)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", ATTENTION_SCRIPT], capture_output=True, text=True, env=env,
                         check=True).stdout
    results = json.loads(out)
    assert max(results["errors"]) < 1e-5, results
    assert all(results["same"]), results
    assert results["products"] >= 2 * 12 + 2 * 9 + 2, results


def test_the_compiled_shim_is_kept_per_source_compiler_and_cpu():
    """A home shared by machines, or a compiler upgrade, builds the shim again instead of loading a stale one."""
    gcc12, gcc13 = blas.Compiler("/usr/bin/gcc", "gcc 12.2"), blas.Compiler("/usr/bin/gcc", "gcc 13.1")
    keys = {blas.shim_key(b"source", gcc12, "avx2 fma"), blas.shim_key(b"source", gcc13, "avx2 fma"),
            blas.shim_key(b"source", gcc12, "avx512f avx2 fma"), blas.shim_key(b"changed", gcc12, "avx2 fma")}
    assert len(keys) == 4
    assert blas.shim_key(b"source", gcc12, "avx2 fma") == blas.shim_key(b"source", gcc12, "avx2 fma")


def _served_compute(home: Path, model: str, monkeypatch, **env: str) -> tuple[dict, int]:
    """/health's compute path and the model's resident bytes, from a server started with `env`."""
    from tests.fixtures.http import request
    from tests.fixtures.server import ServerProcess

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    server = ServerProcess(home, [model], ["--prompt-cache", "0"])
    try:
        admin = server.base_url.removesuffix("/v1")
        compute = request(admin + "/health").json()["compute"]
        loaded = {m["id"]: m for m in request(admin + "/api/v0/ps").json()["data"]}
        return compute, loaded[model]["memory_bytes"]
    finally:
        server.stop()


@SHIM_READY
def test_health_says_which_path_computes_and_that_it_passed_its_self_check(tiny_home: Path, monkeypatch):
    compute, held = _served_compute(tiny_home, "tiny-llama", monkeypatch)
    assert compute["device"] == "cpu" and compute["gemv_shim"] and compute["verified"] is True
    assert "libopenblas" in compute["blas"] and "self-check passed" in compute["note"]


@pytest.fixture(scope="module")
def quantized_home(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, 4-bit: the kind of model the CPU path would dequantize."""
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.utils import save_model

    home = tmp_path_factory.mktemp("quantized-home")
    source, target = tiny_home / "models" / "tiny-llama", home / "models" / "tiny-q4"
    model, _ = load(str(source))
    nn.quantize(model, group_size=32, bits=4)
    target.mkdir(parents=True)
    save_model(target, model)
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 32, "bits": 4}}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, target / name)
    return home


@SHIM_READY
def test_with_the_shim_a_quantized_model_is_held_at_its_quantized_size(quantized_home: Path, monkeypatch):
    """No dense float32 copy: float32 scales, biases and norms at most (it was 8x the size on disk)."""
    _, held = _served_compute(quantized_home, "tiny-q4", monkeypatch)
    on_disk = sum(p.stat().st_size for p in (quantized_home / "models" / "tiny-q4").glob("*.safetensors"))
    assert held <= 2 * on_disk


def test_without_openblas_no_dense_copies_are_built_and_health_says_why(quantized_home: Path, monkeypatch):
    compute, held = _served_compute(quantized_home, "tiny-q4", monkeypatch, MLXSERVE_BLAS="off")
    assert compute["blas"] is None and compute["verified"] is None and "MLXSERVE_BLAS=off" in compute["note"]
    on_disk = sum(p.stat().st_size for p in (quantized_home / "models" / "tiny-q4").glob("*.safetensors"))
    assert held <= 2 * on_disk  # float32 norms and scales at most: no dense float32 weights


def test_a_shim_that_does_not_compile_says_why(tmp_path: Path, monkeypatch):
    """/health and the startup log carry the compiler's own error, not a guess."""
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo 'fake cc 1.0'; exit 0; }\n"
                        "echo 'gemv_shim.c:1:1: error: this compiler refuses' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    why = blas._build_shim()
    assert isinstance(why, str) and "did not compile" in why and "this compiler refuses" in why
