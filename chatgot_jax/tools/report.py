"""The benchmark's report: its printed lines and the --grid markdown table."""

# Benchmark result columns: (result key, title, format); *_bytes values show in GiB.
COLUMNS = [("compile_s", "compile s", "{:.1f}"), ("step_ms", "step ms", "{:.1f}"),
           ("step_ms_p10", "p10", "{:.1f}"), ("step_ms_p90", "p90", "{:.1f}"),
           ("pipelined_step_ms", "pipelined ms", "{:.1f}"),
           ("tokens_per_s", "tokens/s", "{:,.0f}"), ("flops_per_token", "FLOPs/token", "{:.3g}"),
           ("tflops", "TFLOP/s", "{:.3f}"), ("mfu", "MFU", "{:.1%}"),
           ("temp_bytes", "temp GiB", "{:.3f}"), ("argument_bytes", "args GiB", "{:.3f}")]
TORCH_COLUMNS = [("torch_step_ms", "torch step ms", "{:.1f}"),
                 ("torch_tokens_per_s", "torch tokens/s", "{:,.0f}"),
                 ("jax_torch_ratio", "JAX/PyTorch", "{:.2f}x")]
SAMPLE_COLUMNS = [("compile_s", "warm-up s", "{:.1f}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
                  ("decode_tokens_per_s", "decode tokens/s", "{:,.0f}"),
                  ("first_token_ms", "first token ms", "{:.1f}"),
                  ("decode_ms_per_step", "ms/decode step", "{:.2f}")]


def columns_for(results: list[dict]) -> list[tuple]:
    """Sample columns for sample results, else train columns (+ PyTorch ones if present)."""
    if any(r.get("mode") == "sample" for r in results):
        return SAMPLE_COLUMNS
    torch = any("jax_torch_ratio" in r for r in results)
    return COLUMNS + (TORCH_COLUMNS if torch else [])


def cell(r: dict, key: str, fmt: str) -> str:
    v = r.get(key)
    if v is None:
        return "-"
    return fmt.format(v / 2 ** 30 if key.endswith("_bytes") else v)


def format_row(r: dict) -> str:
    """'title value | title value ...' for one benchmark result."""
    return " | ".join(f"{title} {cell(r, key, fmt)}" for key, title, fmt in columns_for([r]))


def report_lines(r: dict) -> list[str]:
    """What the benchmark prints for one result: where, the row, then MFU or PyTorch notes."""
    lines = [f"{r['variant']} {' '.join(r['overrides'])} on {r['devices']} x {r['device']}, "
             f"batch {r['batch']} x {r['seq_len']}".replace("  ", " ")
             + (f", {r['new_tokens']} new tokens" if r.get("mode") == "sample" else ""),
             format_row(r)]
    if "peak_source" in r:
        lines.append(f"MFU against {r['peak_tflops']:.3f} TFLOP/s ({r['peak_source']})")
    if "jax_torch_ratio" in r:
        lines.append(f"JAX {r['tokens_per_s']:,.0f} tokens/s vs PyTorch "
                     f"{r['torch_tokens_per_s']:,.0f} tokens/s ({r['torch_layout']} layout, "
                     f"{r['torch_threads']} threads): JAX/PyTorch {r['jax_torch_ratio']:.2f}x, "
                     f"medians of {r['timed_steps']} steps each")
    return lines


def grid_markdown(points: list[list[str]], results: list[dict], title: str) -> str:
    """A markdown table: one column per grid axis, then the result columns."""
    keys = [o.partition("=")[0] for o in points[0]]
    columns = columns_for([r for r in results if "error" not in r] or [{}])
    lines = [f"# {title}", "", "| " + " | ".join(keys + [c[1] for c in columns]) + " |",
             "|" + "---|" * (len(keys) + len(columns))]
    for point, r in zip(points, results):
        values = [o.partition("=")[2] for o in point]
        cells = ([f"failed: {r['error']}"] + [""] * (len(columns) - 1) if "error" in r
                 else [cell(r, key, fmt) for key, _, fmt in columns])
        lines.append("| " + " | ".join(values + cells) + " |")
    return "\n".join(lines) + "\n"


def shapes_markdown(results: list[dict]) -> str:
    """bench --shapes: the JAX/PyTorch table (medians of the alternated steps)."""
    lines = ["| shape | JAX products | JAX ms/step | PyTorch ms/step | JAX/PyTorch (speed) "
             "| JAX, float32 products, ms/step | its JAX/PyTorch |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        f32 = ((f"{r['f32_step_ms']:.1f}", f"{r['f32_torch_ratio']:.2f}x") if "f32_step_ms" in r
               else ("(the same)", ""))
        lines.append(f"| {r['shape']} | {r['matmul_dtype']} | {r['step_ms']:.1f} "
                     f"| {r['torch_step_ms']:.1f} | {r['jax_torch_ratio']:.2f}x "
                     f"| {f32[0]} | {f32[1]} |")
    return "\n".join(lines)
