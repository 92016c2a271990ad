"""Time to first token for one 512x512 image on a vision model: mlxlite's engine vs raw mlx-vlm.

The model is a random Qwen2-VL made with mlx-vlm's own classes (speed depends on shapes, not
values): `--shape 2b` is Qwen2-VL-2B's (a 32-block, 1280-wide vision tower; a 28-layer,
1536-wide language model; only the vocabulary is the tests' tiny one, so lm_head is nearly
free), `--shape tiny` the tests' toy; `--model DIR` takes a real model directory instead
(mlx-community's Qwen2-VL-2B-Instruct, say). It is imported into a temporary store and
loaded by `runner.load` (float32 weights on CPU, OpenBLAS preloaded when installed, as
`serve` does). Each round times, in alternating order:
  - mlxlite: the chat rendered with the image (`PromptSpec.render`: decode, resize, patches),
    then `runner.generate` to its first token: what a request costs before its first byte;
  - mlx-vlm: `mlx_vlm.stream_generate` on the same loaded weights and processor, to its first
    token (its own prompt preparation included);
  - text only: the same prompt without the image through mlxlite (what the image adds).
Medians over rounds, after one warm-up of each.

    python bench/vision.py [--shape 2b|tiny] [--model DIR] [--rounds 3] [--size 512]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny": {},
    "2b": {"hidden": 1536, "layers": 28, "heads": 12, "kv_heads": 2, "intermediate": 8960,
           "vision_depth": 32, "vision_width": 1280, "vision_heads": 16, "mlp_ratio": 4},
}


def _image(size: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _make(shape: str, root: Path) -> Path:
    from tests.vision_models import make_vision_model

    s = SHAPES[shape]
    # Qwen2-VL's own image budget (max_pixels 12845056) would keep 512x512 as 504x504: 324 tokens.
    return make_vision_model(root / f"qwen2-vl-{shape}", max_pixels=12845056, scale=1.0, **s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="2b")
    ap.add_argument("--model", help="a real vision model directory instead of a random one")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=512, help="the image's width and height")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="mlxlite-bench-vision-"))
    os.environ["MLXLITE_HOME"] = str(tmp / "home")
    from mlxlite.engine import blas

    blas.preload()
    import mlx.core as mx
    from PIL import Image

    from mlxlite.engine import runner
    from mlxlite.options import Options
    from mlxlite.server.prompt import PromptSpec
    from mlxlite.store import Store
    from mlxlite.store.importers import import_path

    t = time.perf_counter()
    model_dir = Path(args.model) if args.model else _make(args.shape, tmp)
    store = Store()
    import_path(store, model_dir, "bench-vl")
    made = time.perf_counter() - t
    t = time.perf_counter()
    loaded = runner.load(store, store.resolve("bench-vl"))
    load_s = time.perf_counter() - t
    image = _image(args.size)
    question = "Describe this picture in one sentence."
    options = Options(temperature=0, num_predict=1)

    def mlxlite_ttft(with_image: bool) -> tuple[float, int]:
        t0 = time.perf_counter()
        msg = {"role": "user", "content": question, **({"images": (image,)} if with_image else {})}
        rendered = PromptSpec("bench-vl", messages=(msg,)).render(loaded, runner, 32768, 1)
        for _ in runner.generate(loaded, rendered.tokens, options, vision=rendered.vision):
            return time.perf_counter() - t0, len(rendered.tokens)
        raise AssertionError("no token")

    from mlx_vlm import stream_generate

    vlm, processor = loaded.model.vlm, loaded.model.processor
    prompt_text = loaded.template.render([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": question}]}])

    def mlx_vlm_ttft() -> float:
        t0 = time.perf_counter()
        picture = Image.open(io.BytesIO(image)).convert("RGB")
        for _ in stream_generate(vlm, processor, prompt_text, image=[picture], max_tokens=1, temperature=0.0):
            return time.perf_counter() - t0
        raise AssertionError("no token")

    params = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(vlm.parameters()))
    print(f"model: {args.model or 'random Qwen2-VL ' + args.shape}, {params / 1e6:.0f}M parameters, "
          f"weights {loaded.info['weights']}, openblas {loaded.info['openblas']}, device {mx.default_device()}")
    print(f"made+imported in {made:.1f} s, loaded in {load_s:.1f} s; image {args.size}x{args.size}")
    _, n_img = mlxlite_ttft(True)
    _, n_txt = mlxlite_ttft(False)
    mlx_vlm_ttft()
    print(f"prompt: {n_img} tokens with the image, {n_txt} without (warm-up done)")
    ours, theirs, text = [], [], []
    for r in range(args.rounds):
        runs = [("ours", lambda: ours.append(mlxlite_ttft(True)[0])),
                ("mlx-vlm", lambda: theirs.append(mlx_vlm_ttft()))]
        for _, run in (runs if r % 2 == 0 else runs[::-1]):
            run()
        text.append(mlxlite_ttft(False)[0])
        print(f"round {r + 1}: mlxlite {ours[-1]:.3f} s, mlx-vlm {theirs[-1]:.3f} s, text only {text[-1]:.3f} s")
    a, b, c = statistics.median(ours), statistics.median(theirs), statistics.median(text)
    print(f"time to first token, one {args.size}x{args.size} image (median of {args.rounds}): "
          f"mlxlite {a:.3f} s, mlx-vlm {b:.3f} s, ratio mlx-vlm/mlxlite {b / a:.3f}; "
          f"the same prompt without the image {c:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
