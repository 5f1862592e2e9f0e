"""What a full `paper` run would cost: teacher tokens and dollars, and student GPU hours.

    python benchmarks/paper_cost.py [--sample 40] [--price-prompt USD --price-completion USD]
                                    [--train-tokens-s N --decode-tokens-s N] [--params 1.5e9]

Measured here, on this machine: the tokens of every turn of the reference chains of the paper
profile's problems (FOL worlds of nmax 10 and 20, GSM8K), replayed through the agent with the
study's prompts, counted with the embedded student's tokenizer (an endpoint's tokenizer differs by
some percent). An endpoint bills each turn for the whole conversation so far (prompt) and the reply
(completion), so a chain's bill is the sum over its turns. The reference chain is what a teacher
that solves the problem in the fewest calls pays; the upper bound is a chain that runs all
`max_steps` turns at `max_tokens_per_turn` (the paper profile's limits).

Not measured here (no GPU): the student's training and decoding rates on a GPU. They are
parameters: `--train-tokens-s` (tokens a second through one DPO step, policy and reference) and
`--decode-tokens-s` (generated tokens a second, all sequences of a batch together). The defaults
are stated assumptions for a 1.5B 4-bit student on one H100-class GPU, printed as such; replace
them with the rates `scripts/gpu_check.sh` measures on your GPU.
"""

from __future__ import annotations

import argparse
import statistics

import yaml

from fclib.models import load_tokenizer
from fclib.runs import PROJECT_ROOT
from fclib.tasks import ProblemSettings, replay_references


def chain_tokens(tokenizer, messages: list[dict], n_prompt: int) -> dict[str, float]:
    """Prompt and completion tokens an endpoint bills for one chain, turn by turn."""
    prompt = completion = turns = 0
    for i in range(n_prompt, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        rendered = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        prompt += len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        completion += len(tokenizer(messages[i]["content"], add_special_tokens=False)["input_ids"])
        turns += 1
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    return {
        "prompt": prompt,
        "completion": completion,
        "turns": turns,
        "first_prompt": len(tokenizer(tokenizer.apply_chat_template(messages[:n_prompt], tokenize=False))["input_ids"]),
        "whole": len(tokenizer(whole, add_special_tokens=False)["input_ids"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=40, help="reference chains measured per task and nmax")
    ap.add_argument("--price-prompt", type=float, default=None, help="USD per million prompt tokens")
    ap.add_argument("--price-completion", type=float, default=None, help="USD per million completion tokens")
    ap.add_argument("--params", type=float, default=1.5e9, help="student parameters (the paper profile: 1.5B)")
    ap.add_argument("--train-tokens-s", type=float, default=None, help="measured DPO training tokens a second")
    ap.add_argument("--decode-tokens-s", type=float, default=None, help="measured generated tokens a second")
    args = ap.parse_args()
    profile = yaml.safe_load((PROJECT_ROOT / "profiles" / "paper.yaml").read_text())
    tokenizer = load_tokenizer("embedded")

    sample = ProblemSettings(
        seed=0, fol_train=args.sample, fol_test=1, nmax=profile["nmax"], gsm8k_train=args.sample, gsm8k_test=1
    ).build()[0]
    by_kind: dict[str, list[dict[str, float]]] = {}
    replayed = replay_references(sample)
    for chain in replayed:
        if not chain.messages:  # a problem without a reference chain (a GSM8K solution the parser cannot replay)
            continue
        problem = next(p for p in sample if p.id == chain.problem_id)
        kind = f"fol nmax {problem.meta.get('nmax')}" if chain.task == "fol" else chain.task
        by_kind.setdefault(kind, []).append(chain_tokens(tokenizer, chain.messages, chain.n_prompt))

    measured = sum(len(rows) for rows in by_kind.values())
    print(
        f"Reference chains measured: {measured} of {len(replayed)} problems (seed 0; the others have none), "
        "tokens by the embedded tokenizer\n"
    )
    print("| problems | turns | first prompt | billed prompt | billed completion | whole chain |")
    print("|---|---|---|---|---|---|")
    mean = {}
    for kind, rows in by_kind.items():
        mean[kind] = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
        m = mean[kind]
        print(
            f"| {kind} | {m['turns']:.1f} | {m['first_prompt']:,.0f} | {m['prompt']:,.0f} | {m['completion']:,.0f} "
            f"| {m['whole']:,.0f} |"
        )

    # the paper profile's chains: training problems x k, and the teacher's own evaluation
    steps, per_turn, k = profile["max_steps"], profile["max_tokens_per_turn"], profile["k"]
    counts = {f"fol nmax {n}": (profile["fol_train"], profile["fol_test"]) for n in profile["nmax"]}
    counts["gsm8k"] = (profile["gsm8k_train"], profile["gsm8k_test"])
    chains = {kind: train * k + test * profile["eval_samples"] for kind, (train, test) in counts.items()}
    low_p = sum(chains[kd] * mean[kd]["prompt"] for kd in chains)
    low_c = sum(chains[kd] * mean[kd]["completion"] for kd in chains)

    def bound(m: dict[str, float]) -> tuple[float, float]:  # all max_steps turns, each reply and result at its longest
        grow = per_turn + (m["whole"] - m["first_prompt"] - m["completion"]) / max(m["turns"], 1)  # reply + result
        return sum(m["first_prompt"] + t * grow for t in range(steps)), steps * per_turn

    high_p = sum(chains[kd] * bound(mean[kd])[0] for kd in chains)
    high_c = sum(chains[kd] * bound(mean[kd])[1] for kd in chains)
    total = sum(chains.values())
    print(f"\nTeacher chains of the paper profile: {total:,} ({k} per training problem, and its test problems)")
    print("| | prompt tokens | completion tokens |")
    print("|---|---|---|")
    print(f"| every chain as long as its reference | {low_p / 1e6:,.1f} M | {low_c / 1e6:,.2f} M |")
    print(
        f"| every chain to max_steps={steps}, {per_turn} tokens a reply "
        f"| {high_p / 1e6:,.1f} M | {high_c / 1e6:,.1f} M |"
    )
    if args.price_prompt is not None and args.price_completion is not None:
        lo = (low_p * args.price_prompt + low_c * args.price_completion) / 1e6
        hi = (high_p * args.price_prompt + high_c * args.price_completion) / 1e6
        print(
            f"At ${args.price_prompt}/M prompt and ${args.price_completion}/M completion tokens (prices as given): "
            f"${lo:,.0f} to ${hi:,.0f}, before any prompt-caching discount"
        )

    # the student: DPO on whole-chain pairs, then greedy evaluation of base and DPO
    cap, epochs = profile["max_pairs_per_problem"], profile["train_epochs"]
    pairs = sum(train * cap for train, _ in counts.values())  # at most: every problem yields its cap
    pair_tokens = sum(train * cap * 2 * mean[kd]["whole"] for kd, (train, _) in counts.items())  # chosen + rejected
    # a frozen 4-bit base: forward 2N, activation gradients 2N, recomputed forward 2N, reference forward 2N
    flops = 8 * args.params * pair_tokens * epochs
    decode = sum(test * 2 * mean[kd]["completion"] for kd, (_, test) in counts.items())  # base and DPO, greedy
    decode_max = sum(test * 2 * steps * per_turn for _, test in counts.values())  # every chain to max_steps
    assumed = args.train_tokens_s is None or args.decode_tokens_s is None
    train_rate = args.train_tokens_s or 989e12 * 0.2 / (8 * args.params)  # H100 bf16 dense peak, 20% utilisation
    decode_rate = args.decode_tokens_s or 32 * 25.0  # batch 32, 25 tokens a second a sequence (transformers generate)
    print(
        f"\nStudent ({args.params / 1e9:.1f}B): at most {pairs:,} pairs, "
        f"{pair_tokens * epochs / 1e6:,.0f} M training tokens"
    )
    print(
        f"over {epochs:g} epochs ({flops / 1e18:,.1f} EFLOP at 8 FLOP a parameter a token); "
        f"{decode / 1e6:,.2f} M tokens"
    )
    print("generated in evaluation (base and DPO, replies only, chains as long as the references).")
    print(
        f"Rates{' (ASSUMED, not measured: pass --train-tokens-s and --decode-tokens-s)' if assumed else ' (given)'}: "
        f"training {train_rate:,.0f} tokens/s, decoding {decode_rate:,.0f} tokens/s"
    )
    hours_train = pair_tokens * epochs / train_rate / 3600
    hours_eval, hours_eval_max = decode / decode_rate / 3600, decode_max / decode_rate / 3600
    print(
        f"GPU hours: training {hours_train:.1f}, evaluation {hours_eval:.1f} (every chain to max_steps: "
        f"{hours_eval_max:.1f}), together {hours_train + hours_eval:.1f} to {hours_train + hours_eval_max:.1f}"
    )


if __name__ == "__main__":
    main()
