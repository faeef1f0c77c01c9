"""`flashlm calibrate` and `flashlm eval`: build neuron selectors into a store, measure how well
each selection does (perplexity against bytes read)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from flashlm.cli.settings import config_option


def cmd_calibrate(a: argparse.Namespace) -> int:
    if a.sign:
        return _sign(a)
    if a.hot_first:
        return _hot_first(a)
    if a.density is not None:
        from flashlm.errors import ConfigError

        raise ConfigError("--density goes with --hot-first (a full calibration fits its selectors at density 0.4)")
    from flashlm.calibration import calibrate

    predictors = calibrate(a.store, tokens=a.tokens, text=a.text, progress=not a.quiet)
    default = predictors.get("default", {})
    if a.json:
        print(json.dumps({"store": a.store, "selectors": sorted(predictors.get("selectors", {})), "default": default}))
    else:
        print(f"calibrated {a.store}: selectors {', '.join(sorted(predictors.get('selectors', {})))}; "
              f"default {default}")
    return 0


def _sign(a: argparse.Namespace) -> int:
    from flashlm.errors import ConfigError
    from flashlm.pipeline.sign_file import write_sign

    if a.hot_first or a.density is not None:
        raise ConfigError("--sign writes only the sign bits; run --hot-first first, as its own command (a reorder "
                          "makes the bits stale)")
    entry = write_sign(a.store, progress=not a.quiet)
    if a.json:
        print(json.dumps({"store": a.store, "sign": entry}))
    else:
        print(f"wrote {entry['path']} into {a.store}: sign bits of gate and up, {entry['resident_bytes']} B "
              f"({entry['resident_bytes'] / 2**20:.1f} MiB) held by selection sign")
    return 0


def _hot_first(a: argparse.Namespace) -> int:
    from flashlm.calibration.hot_first import DEFAULT_DENSITY, reorder

    density = DEFAULT_DENSITY if a.density is None else a.density
    rec = reorder(a.store, tokens=a.tokens, text=a.text, density=density, progress=not a.quiet)
    if a.json:
        print(json.dumps({"store": a.store, "neuron_order": rec}))
    else:
        b, f = rec["prefix_share"]["before"], rec["prefix_share"]["after"]
        print(f"reordered {a.store} hot-first ({rec['calibration']['tokens']} calibration tokens, {rec['seconds']} s): "
              "share of activations on each layer's first " +
              ", ".join(f"{100 * float(k):.0f}% {100 * b[k]:.1f}% -> {100 * f[k]:.1f}%" for k in b))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    plot = a.plot or (str(Path(a.json).with_suffix(".png")) if a.json else None)
    if a.budgets is not None:
        return _eval_budgets(a, plot)
    from flashlm.bench.accuracy import evaluate

    report = evaluate(a.store, quick=a.quick, tokens=a.tokens, json_path=a.json, plot_path=plot, progress=not a.quiet)
    d = report["dense"]
    print(f"dense: ppl wiki {d['ppl_wiki']:.2f}, news {d['ppl_news']:.2f}")
    for r in report["runs"]:
        rule = f"mass {r['mass']:.2f}" if r.get("mass") else f"density {r['density']:.2f}"
        cap = f", cache {100 * r['cache_capacity']:.0f}%" if r.get("cache_capacity") else ""
        print(f"{r['mode']:>9} {rule} k={r['window']}{cap}: ppl wiki {r['ppl_wiki']:.2f} "
              f"news {r['ppl_news']:.2f}, reads {100 * r['ffn_read_fraction']:.2f}% of FFN/token, "
              f"DRAM {100 * r.get('dram_fraction', 0):.0f}% of FFN"
              + (f", recall {r['recall']:.3f}" if r.get("recall") is not None else ""))
    return 0


def _eval_budgets(a: argparse.Namespace, plot: str | None) -> int:
    from flashlm.bench import pyplot
    from flashlm.bench.budget_curve import parse_budgets, plot_budget_curve, run_budget_curve

    budgets = parse_budgets(a.budgets)
    if plot is not None:
        pyplot("the budget plot (--plot, or the PNG next to --json)")  # before the minutes of evaluation
    tokens = a.tokens or (512 if a.quick else 1024)
    settings = {k: v for k, v in (("density", a.density), ("lookahead", a.lookahead)) if v is not None}
    from flashlm.bench.griffin_eval import parse_modes

    report = run_budget_curve(a.store, budgets, tokens=tokens, max_context=a.max_context, json_path=a.json,
                              progress=not a.quiet, settings=settings, modes=parse_modes(a.selection),
                              protocol=a.protocol)
    if plot is not None:
        plot_budget_curve(report, plot)
    d = report["dense"]["ppl"]
    print("dense: ppl " + ", ".join(f"{k} {v:.3f}" for k, v in d.items()))
    for r in report["budgets"]:
        if r["below_minimum"] and "free_selector" not in r:
            print(f"budget {r['fraction']}: selection {r.get('selection')} does not fit: {r['error']}")
        elif r["below_minimum"]:
            fr = r["free_selector"]
            print(f"budget {r['fraction']}: below the engine's minimum of {r['minimum_bytes']} B; with a free selector "
                  f"the caches would hold {100 * fr['cache_fraction']:.1f}% of the FFN"
                  + (": " + ", ".join(f"{k} {100 * v:+.2f}%" for k, v in fr["rel"].items()) if "rel" in fr else ""))
        else:
            gamma = f" (masking gamma {r['cache_gamma']})" if r.get("cache_gamma") else ""
            print(f"budget {r['fraction']}: {r['mode']}, {100 * r['cache_fraction']:.1f}% of the FFN computed or "
                  f"cached, selection {r['selection']}{gamma}: "
                  + ", ".join(f"{k} {100 * v:+.2f}%" for k, v in r["rel"].items()))
    return 0


def add_calibrate(sub: Any) -> None:
    """The `calibrate` command."""
    cal = sub.add_parser("calibrate", help="record the model on text, build neuron selectors into the store",
                         description="Run the dense model over calibration text (the Wikipedia sample in gensim's "
                         "test data, or --text FILE), build shadow copies and low-rank predictors, order neurons by "
                         "co-activation, and write it all into STORE atomically. Needs the calibrate extra "
                         "(pip install 'flashlm[calibrate]'), or --text FILE.",
                         epilog="examples:\n  flashlm calibrate stores/smollm2\n"
                         "  flashlm calibrate stores/llama1b --text my-corpus.txt --tokens 32768 --json\n"
                         "  flashlm calibrate stores/smollm2 --hot-first --tokens 8192\n"
                         "  flashlm calibrate stores/smollm2 --sign")
    cal.add_argument("store", metavar="STORE", help="store directory (changed in place, atomically)")
    cal.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    cal.add_argument("--text", default=None, help="a UTF-8 text file to calibrate on instead")
    cal.add_argument("--hot-first", action="store_true",
                     help="only reorder each layer's neurons on flash by calibrated activation frequency, most used "
                     "first (bundles moved as they are; selectors and statistics kept, permuted); recorded in the "
                     "manifest as extra.neuron_order")
    cal.add_argument("--sign", action="store_true",
                     help="only write the sign selector's file (1 bit per gate and up weight, a scale per row) into "
                     "the store, named by the manifest; for --selection sign. After any --hot-first reorder")
    cal.add_argument("--density", type=float, default=None,
                     help="with --hot-first: a neuron counts as activated by a token when in its top DENSITY "
                     "(default 0.4)")
    cal.add_argument("--quiet", action="store_true", help="no progress bars")
    cal.add_argument("--json", action="store_true", help="print a JSON summary")
    cal.set_defaults(func=cmd_calibrate)


def add_eval(sub: Any) -> None:
    """The `eval` command."""
    ev = sub.add_parser("eval", help="perplexity vs bytes read per token for each selection mode",
                        description="Perplexity on held-out Wikipedia and news text for dense, oracle, shadow, gate "
                        "and predictor selections at several densities and windows; JSON + a PNG plot (needs "
                        "matplotlib).",
                        epilog="examples:\n  flashlm eval stores/smollm2 --quick --json benchmarks/results/eval-quick.json\n"
                        "  flashlm eval stores/smollm2 --tokens 8192 --json eval.json --plot eval.png\n"
                        "  flashlm eval stores/qwen15-q4 --budgets 1,0.75,0.5,0.35 --json budgets.json")
    ev.add_argument("store", metavar="STORE", help="store directory (calibrated, for the predictor modes)")
    ev.add_argument("--quick", action="store_true", help="a few thousand tokens per text")
    ev.add_argument("--tokens", type=int, default=None, help="tokens per text (overrides --quick)")
    ev.add_argument("--json", default=None, metavar="FILE", help="JSON file to write")
    ev.add_argument("--plot", default=None, metavar="FILE", help="PNG to write (default: next to --json)")
    ev.add_argument("--budgets", default=None, metavar="F,F,...",
                    help="perplexity against the memory budget instead: fractions of the model's store bytes "
                    "(e.g. 1,0.75,0.5,0.35), each run with the cache and selection the engine plans at it; wiki, "
                    "news and code")
    config_option(ev, "max_context", default=2048, note="with --budgets, the KV cache the plan sizes for: ")
    config_option(ev, "density", note="with --budgets: ")
    config_option(ev, "selection", metavar="S,S,...", note="with --budgets: the selections to run at every budget, "
                  "comma-separated, e.g. auto,griffin,griffin:0.5,sign (NAME:G: cache-aware masking gamma G, NAME@D: "
                  "density D, for griffin and sign). ")
    ev.add_argument("--protocol", default=None, choices=["continuation", "full"],
                    help="with --budgets: continuation scores the second half of each sequence, its first half the "
                    "prompt (default when griffin or sign runs); full scores every token (default otherwise)")
    config_option(ev, "lookahead", "--lookahead", note="with --budgets: ")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval)
