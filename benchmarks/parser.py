"""Parsing time against reply length: linear means the time per KB stays flat as replies grow.

    python benchmarks/parser.py

Each shape is a reply a model or endpoint could send (unclosed calls, open quotes, escapes,
many closed calls); it is repeated to each length and parsed, best of three. The table
prints milliseconds and milliseconds per KB; a quadratic scanner shows the per-KB column
growing with the length (an earlier one took over 2 s on 20 KB of `f(`).
"""

from __future__ import annotations

import time

from fclib.protocol import MAX_SCAN_CHARS, CallSyntaxError, parse_call

SHAPES = {
    "unclosed calls f(": "f(",
    "calls in quotes f('": "f('",
    'escapes f("\\': 'f("\\',
    "closed calls f()": "f()",
    "prose with a call": "so we add(a=1, b=2) and then ",
    "open parens (": "(",
    "Cyrillic glued жadd(": "жadd(",
}


def parse_ms(text: str) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        try:
            parse_call(text, {"f", "add"})
        except CallSyntaxError:
            pass
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def main() -> None:
    lengths = [1250, 2500, 5000, 10000, MAX_SCAN_CHARS]
    print(f"{'shape':24}" + "".join(f"{n / 1000:>7.2f} KB" for n in lengths) + "   ms per KB at each length")
    for label, unit in SHAPES.items():
        ms = [parse_ms((unit * (n // len(unit) + 1))[:n]) for n in lengths]
        per_kb = [m / (n / 1000) for m, n in zip(ms, lengths)]
        print(f"{label:24}" + "".join(f"{m:7.1f} ms" for m in ms) + "   " + " ".join(f"{p:.2f}" for p in per_kb))


if __name__ == "__main__":
    main()
