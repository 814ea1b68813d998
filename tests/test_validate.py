"""edgedistill.distill.validate: each reject reason on a crafted row, none on clean rows, report arithmetic."""

from __future__ import annotations

import random

import pytest
from edgedistill.distill.validate import REASONS, format_report_table, jaccard, shingles, validate_rows

from edgedistill.spec import TaskSpec

LABELS = ["card_arrival", "exchange_rate", "top_up_failed"]
SEEDS = [
    ("I am still waiting on my card, when will it arrive?", "card_arrival"),
    ("My new card has not been delivered yet.", "card_arrival"),
    ("How long does card delivery take?", "card_arrival"),
    ("Is there a tracking number for my card?", "card_arrival"),
    ("What is the exchange rate for euros today?", "exchange_rate"),
    ("How do you calculate your exchange rates?", "exchange_rate"),
    ("Which rate do I get when I pay in dollars?", "exchange_rate"),
    ("My top up failed, please help me with it.", "top_up_failed"),
    ("Why did my top-up not go through?", "top_up_failed"),
    ("The top up was declined twice this morning.", "top_up_failed"),
]
TEST_INPUTS = [
    "I would like to know why my top up was declined this morning at the shop",
    "where is my card",
    "What exchange rate will I get for dollars to euros today?",
    "card not arrived",
    "top up",
]


def _base(tmp_path) -> dict:
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(f'{{"input": "{t}", "output": "card_arrival"}}\n' for t in TEST_INPUTS))
    return {
        "name": "tiny",
        "instructions": "Classify the intent of this banking message.",
        "seeds": [{"input": i, "output": o} for i, o in SEEDS],
        "test_set": {"path": str(test_file)},
        "pool": {"path": str(tmp_path / "pool.jsonl"), "output_field": None},
        "teacher": {"kind": "local", "path": "x"},
        "student": {"path": "x"},
    }


@pytest.fixture
def spec(tmp_path) -> TaskSpec:
    return TaskSpec.model_validate({**_base(tmp_path), "type": "classification", "labels": LABELS})


SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "integer"}, "time": {"type": "string"}},
    "required": ["people", "time"],
    "additionalProperties": False,
}


@pytest.fixture
def xspec(tmp_path) -> TaskSpec:
    base = _base(tmp_path)
    base["seeds"] = [{"input": f"table for {i} at 7pm please", "output": {"people": i, "time": "7pm"}} for i in range(1, 11)]
    return TaskSpec.model_validate({**base, "type": "extraction", "output_schema": SCHEMA})


def seed_rows() -> list[dict]:
    return [{"id": f"seed-{i}", "input": t, "output": o, "source": "seed"} for i, (t, o) in enumerate(SEEDS)]


def row(i, text, raw, source="synthetic", **extra) -> dict:
    return {"id": f"r{i}", "input": text, "output": None, "raw_output": raw, "source": source, **extra}


CLEAN = [
    ("Could you tell me the fee for sending money abroad to Japan", "exchange_rate"),
    ("I topped up with my visa but the money never showed up", " top_up_failed."),
    ("The courier said my card was delivered but I never got it", "Card_Arrival"),
    ("Do you offer a better rate on weekends for pounds?", "exchange_rate"),
    ("It keeps saying top-up unsuccessful when I use apple pay", '"top_up_failed"'),
]


def clean_rows() -> list[dict]:
    return [row(i, t, raw) for i, (t, raw) in enumerate(CLEAN)]


def run(spec, rows, tests=TEST_INPUTS):
    kept, rejected, report = validate_rows(spec, rows, tests)
    assert report["kept"] + sum(report["rejected"].values()) == report["total"] == len(rows)
    assert len(kept) == report["kept"] and len(rejected) == report["total"] - report["kept"]
    assert sum(s["total"] for s in report["by_source"].values()) == report["total"]
    assert sum(s["kept"] for s in report["by_source"].values()) == report["kept"]
    assert set(report["rejected"]) == set(REASONS)
    return kept, rejected, report


def reasons(rejected) -> dict[str, str]:
    return {r["id"]: r["reject_reason"] for r in rejected}


def test_clean_rows_all_kept(spec):
    rows = seed_rows() + clean_rows()
    kept, rejected, report = run(spec, rows)
    assert rejected == []
    assert report["rejected"] == dict.fromkeys(REASONS, 0)
    assert [r["id"] for r in kept] == [r["id"] for r in rows]  # order kept
    assert [r["output"] for r in kept[10:]] == [
        "exchange_rate",
        "top_up_failed",
        "card_arrival",
        "exchange_rate",
        "top_up_failed",
    ]
    assert report["label_counts"] == {"card_arrival": 5, "exchange_rate": 5, "top_up_failed": 5}
    assert report["by_source"]["seed"]["kept"] == 10 and report["by_source"]["synthetic"]["kept"] == 5
    assert "reject_reason" not in kept[0]
    assert rows[10]["output"] is None  # the caller's rows are not modified


@pytest.mark.parametrize(
    "text,raw,extra,reason",
    [
        ("Please help me with my card it has not come", "I think this is about a card", {}, "parse"),
        ("Please help me with my card it has not come", "", {}, "parse"),
        ("hi", "card_arrival", {}, "too_short"),
        ("my card " * 200, "card_arrival", {}, "too_long"),
        # shares the 8-gram "why my top up was declined this morning" with a test input
        ("Hello, why my top up was declined this morning at the till?", "top_up_failed", {}, "contaminated"),
        # the same words as a test input: case and punctuation do not hide it
        ("WHERE is my card??", "card_arrival", {}, "contaminated"),
        # a MinHash near-duplicate of a test input (one typo, no shared 8-gram)
        ("what exchange rate will i get for dolars to euros today", "exchange_rate", {}, "contaminated"),
        # contains a whole short (3-word) test input
        ("hey, my card not arrived yet, any news?", "card_arrival", {}, "contaminated"),
        # a short row contained in a test input
        ("my top up was declined", "top_up_failed", {}, "contaminated"),
        (
            "Do you offer a better rate on weekends for pounds?",
            "exchange_rate",
            {"consistency_output": "card_arrival"},
            "inconsistent",
        ),
        ("Do you offer a better rate on weekends for pounds?", "exchange_rate", {"consistency_output": None}, "inconsistent"),
    ],
)
def test_each_reason(spec, text, raw, extra, reason):
    bad = row(99, text, raw, **extra)
    _kept, rejected, report = run(spec, seed_rows() + [bad])
    assert reasons(rejected) == {"r99": reason}
    assert report["rejected"][reason] == 1
    assert sum(report["rejected"].values()) == 1
    assert rejected[0]["reject_detail"]


def test_all_reasons_together(spec):
    rows = seed_rows() + clean_rows()
    rows += [
        row(10, "Could you tell me the fee for sending money abroad to Japan", "exchange_rate"),  # exact copy of r0
        row(11, "could you tell me the FEE for sending money abroad to japan!!", "exchange_rate"),  # normalised copy
        row(12, "i topped up with my visa but the mony never showed up", "top_up_failed"),  # typo of r1
        row(13, "what is the exchnage rate for euros today", "exchange_rate"),  # a typo of a seed
        row(14, "ok", "card_arrival"),
        row(15, "Tell me the rate you give for yen compared with the pound", "exchange_rate", consistency_output="top_up_failed"),
        row(
            16,
            "Tell me the rate you give for swiss francs against the dollar",
            "exchange_rate",
            consistency_output="Exchange_Rate",
        ),
        row(17, "What exchange rate will I get for dollars to euros today?", "exchange_rate"),
        row(18, "Where has my card got to, I ordered it ages ago", "no idea"),
    ]
    _kept, rejected, report = run(spec, rows)
    assert reasons(rejected) == {
        "r10": "exact_duplicate",
        "r11": "exact_duplicate",
        "r12": "near_duplicate",
        "r13": "near_duplicate",
        "r14": "too_short",
        "r15": "inconsistent",
        "r17": "contaminated",
        "r18": "parse",
    }
    assert report["rejected"] == {
        "truncated": 0,
        "parse": 1,
        "too_short": 1,
        "too_long": 0,
        "contaminated": 1,
        "exact_duplicate": 2,
        "near_duplicate": 2,
        "inconsistent": 1,
    }
    assert report["kept"] == 16  # 10 seeds, 5 clean, r16 (its second answer parses to the same label)
    assert report["by_source"]["synthetic"] == {
        "total": 14,
        "kept": 6,
        "rejected": {**dict.fromkeys(REASONS, 0), **report["rejected"]},
    }
    by_id = {r["id"]: r for r in rejected}
    assert by_id["r10"]["reject_detail"] == "same as r0"
    assert by_id["r13"]["reject_detail"] == "near seed-4"
    table = format_report_table(report)
    for reason in REASONS:
        assert reason in table
    assert "synthetic" in table and "card_arrival" in table


def test_near_duplicate_threshold_is_jaccard_on_shingles():
    a = "i topped up with my visa but the money never showed up"
    b = "i topped up with my visa but the mony never showed up"
    assert jaccard(shingles(a), shingles(b)) >= 0.8
    assert jaccard(shingles(a), shingles("how long does card delivery take")) < 0.2


def test_seeds_never_dropped_as_duplicates(spec):
    seeds = seed_rows()
    twin = {**seeds[0], "id": "seed-twin"}  # two identical seeds: both stay
    early = row(0, SEEDS[1][0].upper(), "card_arrival", source="pool")  # arrives before the seeds
    typo = row(1, "I am stil waiting on my card, when wil it arrive?", "card_arrival")
    _kept, rejected, report = run(spec, [early] + seeds + [twin, typo])
    assert reasons(rejected) == {"r0": "exact_duplicate", "r1": "near_duplicate"}
    assert report["by_source"]["seed"] == {"total": 11, "kept": 11, "rejected": dict.fromkeys(REASONS, 0)}


def test_seeds_are_checked_for_contamination(spec):
    seeds = seed_rows()
    _kept, rejected, _ = run(spec, seeds, tests=TEST_INPUTS + [SEEDS[3][0].lower()])
    assert reasons(rejected) == {"seed-3": "contaminated"}


def test_rejected_rows_do_not_block_later_duplicates(spec):
    rows = [
        row(0, "Why is my card taking so long to arrive here", "garbage"),
        row(1, "Why is my card taking so long to arrive here", "card_arrival"),
    ]
    kept, rejected, _ = run(spec, seed_rows() + rows)
    assert reasons(rejected) == {"r0": "parse"}
    assert kept[-1]["id"] == "r1"


def test_first_seen_duplicate_kept(spec):
    rows = [
        row(0, "Why is my card taking so long to arrive here", "card_arrival"),
        row(1, "why is my card taking so long to arrive here.", "card_arrival"),
    ]
    _kept, rejected, _ = run(spec, seed_rows() + rows)
    assert reasons(rejected) == {"r1": "exact_duplicate"}


def test_short_test_inputs_do_not_contaminate_by_containment(spec):
    # "top up" (2 words) is a test input: only an identical input counts, not containment.
    _kept, rejected, _ = run(
        spec, seed_rows() + [row(0, "my top up failed again today", "top_up_failed"), row(1, "Top up!", "top_up_failed")]
    )
    assert reasons(rejected) == {"r1": "contaminated"}


def test_extraction_rows_checked_against_schema(xspec):
    seeds = [{"id": f"seed-{i}", "input": s.input, "output": s.output, "source": "seed"} for i, s in enumerate(xspec.seeds)]
    rows = seeds + [
        row(0, "book a table for two at 8pm", 'Sure! {"people": 2, "time": "8pm"}'),
        row(1, "four of us at noon tomorrow", "I cannot help with that"),
        row(2, "table for 3, 6pm", '{"people": "three", "time": "6pm"}'),
        row(3, "we are five, around 9pm", '{"people": 5}'),
        row(4, "six people, 9:30pm", '{"people": 6, "time": "9:30pm", "name": "bob"}'),
        row(
            5,
            "table for seven at half past eight",
            '{"people": 7, "time": "8:30pm"}',
            consistency_output={"time": "8:30PM ", "people": 7.0},
        ),
        row(6, "a table for eight at nine", '{"people": 8, "time": "9pm"}', consistency_output={"people": 8, "time": "10pm"}),
        row(7, "nine of us at ten please", '{"people": 9, "time": "10pm"}', consistency_output='{"people": 9, "time": "10pm"}'),
    ]
    kept, rejected, report = run(xspec, rows)
    assert reasons(rejected) == {"r1": "parse", "r2": "parse", "r3": "parse", "r4": "parse", "r6": "inconsistent"}
    assert {r["id"] for r in kept} >= {"r0", "r5", "r7"}
    assert next(r for r in kept if r["id"] == "r0")["output"] == {"people": 2, "time": "8pm"}
    assert report["label_counts"] == {}
    assert report["by_source"]["seed"]["kept"] == 10


def test_qa_rows(tmp_path):
    qspec = TaskSpec.model_validate({**_base(tmp_path), "type": "qa"})
    rows = [
        row(0, "What is the capital of France?", "Paris"),
        row(1, "What is the capital of Italy?", "   "),
        row(2, "What is the capital of Spain?", "Madrid", consistency_output="madrid."),
        row(3, "What is the capital of Peru?", "Lima", consistency_output="Cusco"),
    ]
    _kept, rejected, _ = run(qspec, rows)
    assert reasons(rejected) == {"r1": "parse", "r3": "inconsistent"}


def test_empty_input(spec):
    kept, rejected, report = run(spec, [], [])
    assert kept == rejected == []
    assert report["total"] == 0 and report["kept"] == 0
    assert "0 rows" in format_report_table(report)


def _many_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    subjects = ["my card", "the transfer", "my top up", "the exchange rate", "my refund", "the payment", "my pin", "the app"]
    verbs = [
        "is not working",
        "was declined",
        "has not arrived",
        "looks wrong",
        "is pending",
        "failed",
        "is too slow",
        "was charged twice",
    ]
    tails = ["today", "since monday", "again", "for the third time", "after the update", "abroad", "on my phone", "at the atm"]
    rows = []
    for i in range(n):
        words = [rng.choice(subjects), rng.choice(verbs), rng.choice(tails), f"order {rng.randrange(100000)}"]
        if rng.random() < 0.2:
            words.append(rng.choice(["please help", "what now", "thanks", "asap"]))
        rows.append(row(i, " ".join(words).capitalize(), rng.choice(LABELS + ["?"]), source=rng.choice(["synthetic", "pool"])))
    return rows


def test_ten_thousand_rows_run_and_are_deterministic(spec):
    rows = seed_rows() + _many_rows(10_000)
    tests = [f"{t} number {i}" for i, t in enumerate(TEST_INPUTS * 40)]
    kept, _rejected, report = run(spec, rows, tests)
    assert report["total"] == 10_010
    assert report["rejected"]["parse"] > 0 and report["rejected"]["near_duplicate"] > 0
    kept2, _rejected2, report2 = validate_rows(spec, rows, tests)
    assert report2 == report
    assert [r["id"] for r in kept2] == [r["id"] for r in kept]
