"""The engine wing: the only place that imports mlx (and mlx-lm).

Owns running a stored model on MLX. `runner` is the engine's protocol, what the scheduler
drives on its one MLX thread: `load`, `generate`, `embed`, `decoder` (continuous batching)
and the prefix-cache pieces; behind it `model` (a loaded model and its primitives),
`batch` (the batch decoder), `speculative` (its drafts, verified in one batched step),
`gguf` (GGUF tensors onto mlx-lm's model classes), `encoder` (the bert-family embedding
encoder mlx-lm lacks), `vision` (vision-language models through mlx-vlm, the optional extra
`mlxlite[vision]`, imported only when a vision model loads; it decodes one sequence at a
time through `results.SerialDecoder`), `distributed` (the step broadcast and shards of a `serve --ranks`
group), `quants` (GGUF's quantized blocks read and repacked into MLX's formats), `sampling`
(Ollama's options as mlx-lm samplers, the constraint mask), `text` (token bytes, streaming
text, stop strings) and `quantize` (`create --quantize`: a float model into MLX's q4, q8,
mxfp4, nvfp4; run on the caller's thread, not the scheduler's). `blas` preloads OpenBLAS
and must run before mlx is imported, so this file imports nothing: callers import the
module they need (`from mlxlite.engine import runner`), and importing the wing costs
nothing. Never imports the scheduler, the server or the CLI.
"""
