"""How close the draft planner comes to the best plan on a text: a replay, at 1 in flight.

    python -m bench.draft_replay [--documents bench/unseen.jsonl] [--docs 12]
                                 [--price-with STEP_COSTS.json] [--borrow]
                                 [--save-texts TEXTS.json | --texts TEXTS.json]

The engine writes each document's greedy text once, alone and at its full length
(`--speculation auto`, as `bench.speculation --fixed-length` runs it), and times its steps by
batch rows before serving. Then, without the model, every step of that text is replayed:
the draft the engine's drafter (engine/ngrams.py) offers at each point is fixed by the text
so far, and how many of its tokens the text goes on with is known. The plans are priced on
the engine's own step times:

- `plain`: one token a step;
- `planner`: the engine's plan for a request alone whose text must repeat (`own_rate`
  against `STEEP_ROW_COST`, engine/drafts.py). Its drafted and accepted tokens must equal
  the live run's, which the table shows beside them: the replay is the engine's plan;
- `planner, priced curve`: the same estimates planned against the very step times the
  plans are priced with, as a repeatable plan could be with a fixed per-host curve;
- `planner, GPU shape`: the plan of an engine with every layer on a GPU, which plans a
  repeatable request against `GPU_ROW_COST` instead (with `--price-with` a GPU's curve);
- `foresight`: the fastest plan of all, which knows how much of every draft the text takes
  (a shortest path over the text's positions). No planner can beat it with these drafts:
  the room left between it and `planner` is all that better estimates could win.

`--borrow` adds the live plan, as for a request whose text need not repeat (unseeded, run
alone): rates learned over the documents in order (`Acceptance.rate`), planned on the very
step times it is priced with, as the engine plans on the times it measures; then the same
with drafts borrowed from the texts of the documents before (`RecentTexts`, where a
document's own prompt and text have no match), and the foresight of those drafts.

Seconds are the summed step times of decoding alone: no sampling, no prompts, no Python.
Text is read back as tokens by the model's tokenizer. `--price-with` prices the same plans
with another model's step times, as `bench.verify_cost --out` writes them (for example
Genstruct-7B's shape, `--model synthetic`): what the drafts of this text would buy on that
model's cost curve.

Greedy text moves with the drafting: a row verified in another batch shape can tip a token,
so a planner that drafts otherwise writes other texts, and its replay weighs it on those.
To compare two planners on one text, write the texts once with `--save-texts` and replay
them with `--texts` under the other. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from genstruct_service.engine import speculation
from genstruct_service.engine.ngrams import History, PromptNgrams, RecentTexts
from genstruct_service.engine.step_cost import GPU_ROW_COST, STEEP_ROW_COST, StepCost

from bench import settings
from bench.speculation import documents
from bench.throughput import drive


@dataclass(frozen=True)
class Point:
    """Where the text has `at` tokens: the draft offered there and how much of it the text
    goes on with."""

    at: int
    match: int  # the match the draft came from (0: no draft)
    draft: int  # its tokens
    good: int  # how many of them the text goes on with
    agreed: int = 0  # Draft.agreed
    contested: bool = False  # Draft.contested
    borrowed: bool = False  # Draft.borrowed


@dataclass
class Plan:
    seconds: float = 0.0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    def step(self, seconds: float, drafted: int, accepted: int) -> None:
        self.seconds += seconds
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted


def points(
    prompt: list[int], text: list[int], spec: speculation.SpeculationSettings,
    recent: RecentTexts | None = None,
) -> list[Point]:
    """The draft at each decode step's start, as the engine asks for it: the first token
    comes from the prompt's step, and the last token of the budget is never drafted. With
    `recent`, borrowing from it where the text's own sources have nothing."""
    history = History(PromptNgrams(prompt, spec.ngram_min), spec.ngram_max)
    history.append(text[0])
    found = []
    for at in range(1, len(text)):
        budget = len(text) - at - 1
        draft = history.draft(min(spec.draft_max, budget), recent)
        if draft is None:
            found.append(Point(at, 0, 0, 0))
        else:
            good = 0
            while good < len(draft.tokens) and draft.tokens[good] == text[at + good]:
                good += 1
            found.append(Point(
                at, draft.match, len(draft.tokens), good, draft.agreed, draft.contested,
                draft.borrowed,
            ))  # fmt: skip
        history.append(text[at])
    return found


def borrowing_points(
    pairs: list[tuple[list[int], list[int]]], spec: speculation.SpeculationSettings
) -> list[list[Point]]:
    """`points` for each (prompt, text) in order, borrowing from the texts before it."""
    recent = RecentTexts(spec.ngram_min)
    texts = []
    for prompt, text in pairs:
        texts.append(points(prompt, text, spec, recent))
        recent.add(text)
    return texts


def replay_planner(
    texts: list[list[Point]], price: list[float], ngram_max: int, cost: StepCost | None = None
) -> Plan:
    """The engine's plan for a repeatable request alone (engine/drafts.py), step by step,
    against `cost` (default: `STEEP_ROW_COST`, as the engine plans it)."""
    fixed = cost if cost is not None else StepCost.fixed(STEEP_ROW_COST)
    return _replay(texts, price, ngram_max, fixed, live=False)


def replay_live(
    texts: list[list[Point]], price: list[float], ngram_max: int, cost: StepCost
) -> Plan:
    """The engine's live plan for a request alone whose text need not repeat, step by step:
    rates learned over the texts in order, borrowed drafts apart (engine/drafts.py)."""
    return _replay(texts, price, ngram_max, cost, live=True)


def _replay(
    texts: list[list[Point]], price: list[float], ngram_max: int, cost: StepCost, *, live: bool
) -> Plan:
    """Each text step by step as the engine plans a request alone against `cost`: from
    rates learned over the texts (`live`), or from each text's own record and the start."""
    acceptance = speculation.Acceptance(ngram_max)
    plan = Plan()
    for found in texts:
        record = speculation.DraftRecord()
        i = 0
        while i < len(found):
            p = found[i]
            k = 0
            if p.draft:
                tried = record.of(p.match, borrowed=p.borrowed)
                rate = (
                    acceptance.rate(p.match, *tried, borrowed=p.borrowed) if live
                    else acceptance.own_rate(p.match, *tried, greedy=True)
                )  # fmt: skip
                candidate = speculation.Candidate(
                    rate, p.draft, agreed=p.agreed,
                    agreed_rate=speculation.AGREED_ACCEPTANCE[0], contested=p.contested,
                )
                k = speculation.plan_drafts(
                    [candidate], generating=1, decode_rows=1,
                    prompt_rows=0, batch_rows=len(price), cost=cost, sample_seconds=0.0,
                    lift=speculation.KEPT_LIFT,
                )[0]
            accepted = min(k, p.good)
            if k:
                record.add(p.match, k, accepted, borrowed=p.borrowed)
                if live:
                    acceptance.record(p.match, k, accepted, borrowed=p.borrowed)
            plan.step(price[k + 1], k, accepted)
            i += accepted + 1
    return plan


def foresight(texts: list[list[Point]], price: list[float]) -> Plan:
    """The fastest plan that knows each draft's outcome: at each point, any length of the
    draft offered (tokens past its good ones only buy a cheaper row count)."""
    plan = Plan()
    for found in texts:
        n = len(found)
        best: list[tuple[float, int]] = [(0.0, 0)] * (n + 1)  # (seconds to the end, k)
        for i in range(n - 1, -1, -1):
            p = found[i]
            best[i] = min(
                (price[k + 1] + best[min(i + min(k, p.good) + 1, n)][0], k)
                for k in range(p.draft + 1)
            )
        i = 0
        while i < n:
            k = best[i][1]
            accepted = min(k, found[i].good)
            plan.step(price[k + 1], k, accepted)
            i += accepted + 1
    return plan


def generate(args: argparse.Namespace) -> tuple[list[tuple[str, str]], dict[int, float], int, int]:
    """Each document's prompt and greedy text from the engine alone, its step times by rows,
    and its live drafted and accepted tokens."""
    from genstruct_service.engine import GenerationRequest, Sampling
    from genstruct_service.engine.llama import LlamaEngine
    from genstruct_service.prompt import GENSTRUCT_FORMAT, render_prompt

    docs = documents(args.docs, args.documents)
    kwargs = settings.engine_kwargs(args)
    kwargs["speculation"] = spec_settings(args)
    engine = LlamaEngine(
        args.model, prompt_format=GENSTRUCT_FORMAT, n_parallel=1, max_queue=len(docs), **kwargs
    )
    sampling = Sampling(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    requests = [GenerationRequest(d.title, d.content, sampling, stream=False) for d in docs]
    done, _ = asyncio.run(drive(engine, requests, 1))  # one at a time: in document order
    costs = engine.step_costs()
    pairs = [
        (render_prompt(d.title, d.content), c.generations[0].text)
        for d, c in zip(docs, done, strict=True)
    ]
    drafted = sum(c.draft_tokens for c in done)
    accepted = sum(c.accepted_draft_tokens for c in done)
    return pairs, costs, drafted, accepted


@dataclass(frozen=True)
class Written:
    """What the engine wrote alone: each document's prompt and text, its step times by rows,
    and the tokens it drafted and had accepted doing so."""

    pairs: list[tuple[str, str]]
    step_costs: dict[int, float]
    drafted: int
    accepted: int

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Written:
        saved = json.loads(path.read_text())
        return cls(
            [(prompt, text) for prompt, text in saved["pairs"]],
            {int(rows): seconds for rows, seconds in saved["step_costs"].items()},
            saved["drafted"], saved["accepted"],
        )


def spec_settings(args: argparse.Namespace) -> speculation.SpeculationSettings:
    return speculation.SpeculationSettings(
        mode="auto", draft_max=args.spec_draft_max, ngram_min=args.spec_ngram_min,
        ngram_max=args.spec_ngram_max,
    )


def main(argv: Sequence[str] | None = None) -> int:
    defaults = speculation.SpeculationSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    settings.add_arguments(parser, n_ctx=1024)
    parser.add_argument("--docs", type=int, default=12)
    parser.add_argument("--documents", type=Path, default=Path("bench/unseen.jsonl"))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--spec-draft-max", type=int, default=defaults.draft_max)
    parser.add_argument("--spec-ngram-min", type=int, default=defaults.ngram_min)
    parser.add_argument("--spec-ngram-max", type=int, default=defaults.ngram_max)
    parser.add_argument("--price-with", type=Path,
                        help="step seconds by rows (JSON) to price the plans with, in place "
                        "of the engine's own")
    parser.add_argument("--borrow", action="store_true",
                        help="also replay the live plan, without and with drafts borrowed "
                        "from the documents before")
    parser.add_argument("--save-texts", type=Path,
                        help="write the texts, step times and live drafts (JSON) for --texts")
    parser.add_argument("--texts", type=Path,
                        help="replay what --save-texts wrote instead of writing texts: greedy "
                        "text moves with the drafting, so two planners compare on one text")
    args = parser.parse_args(argv)
    settings.resolve(args)

    import llama_cpp

    if args.texts:
        written = Written.load(args.texts)
    else:
        written = Written(*generate(args))
        if args.save_texts:
            written.save(args.save_texts)
    pairs, costs = written.pairs, written.step_costs
    if not costs:
        raise SystemExit("the engine timed no steps before serving: nothing to price")
    vocab = llama_cpp.Llama(args.model, vocab_only=True, verbose=False)
    spec = spec_settings(args)
    ids = [
        (vocab.tokenize(prompt.encode(), add_bos=True, special=True),
         vocab.tokenize(text.encode(), add_bos=False, special=True))
        for prompt, text in pairs
    ]  # fmt: skip
    texts = [points(prompt, text, spec) for prompt, text in ids]
    if args.price_with:
        costs = {int(rows): s for rows, s in json.loads(args.price_with.read_text()).items()}
    curve = StepCost.fixed(costs)
    price = curve.prices(spec.draft_max + 1)

    n_steps = sum(len(found) for found in texts)  # decoding a token a step
    plain = n_steps * price[1]
    plans = [
        ("planner", replay_planner(texts, price, spec.ngram_max)),
        ("planner, priced curve", replay_planner(texts, price, spec.ngram_max, curve)),
        ("planner, GPU shape",
         replay_planner(texts, price, spec.ngram_max, StepCost.fixed(GPU_ROW_COST))),
        ("foresight", foresight(texts, price)),
    ]
    if args.borrow:
        borrowing = borrowing_points(ids, spec)
        plans += [
            ("live", replay_live(texts, price, spec.ngram_max, curve)),
            ("live, borrowing", replay_live(borrowing, price, spec.ngram_max, curve)),
            ("foresight, borrowing", foresight(borrowing, price)),
        ]
    steps = ", ".join(f"{n}: {price[n] * 1e3:.1f}" for n in range(1, len(price)))
    print(f"{len(texts)} documents of {args.documents}, greedy, {args.max_tokens} tokens each; "
          f"priced with {args.price_with or 'its own step times'}, ms by rows: {steps}")
    header = ("plan", "seconds", "vs plain", "steps", "drafted", "accepted")
    print("{:<22} {:>8} {:>9} {:>6} {:>8} {:>9}".format(*header))
    print(f"{'plain':<22} {plain:8.2f} {1.0:8.2f}x {n_steps:6d} {0:8d} {0:9d}")
    for name, plan in plans:
        print(f"{name:<22} {plan.seconds:8.2f} {plain / plan.seconds:8.2f}x {plan.steps:6d} "
              f"{plan.drafted:8d} {plan.accepted:9d}")
    planned = plans[0][1]
    live = f"the run that wrote {args.texts}" if args.texts else "the live run"
    print(f"{live} drafted {written.drafted} and accepted {written.accepted} tokens; the "
          f"planner's replay {planned.drafted} and {planned.accepted}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
