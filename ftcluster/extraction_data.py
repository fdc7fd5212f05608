"""``builtin:extract-json``: an offline structured-extraction task, of another kind than the pydoc ones.

Each example is one sentence about a payment (a receipt, an invoice line, a refund note...) in one of several
phrasings, with its date and amount written in one of several styles; the answer is the same facts as one line of
JSON with fixed keys, the date as ``YYYY-MM-DD`` and the amount in whole dollars: "Invoice for Alice Moreau,
Lyon: $1,250, dated 5 March 2021." is answered ``{"name": "Alice Moreau", "city": "Lyon", "date": <that day as
YYYY-MM-DD>, "amount": 1250}``.

The answer follows from the sentence, so it is scored by exact match. A model must learn the output format and
the normalisation (month names to numbers, thousands separators and currency words dropped); a small instruct
model answers in prose or with other keys before fine-tuning. The records come from a fixed seed, so the dataset
is the same everywhere; the held-out examples are chosen by a hash of each example's id (as the pydoc tasks'),
and a sentence is never in both splits.
"""

from __future__ import annotations

import datetime as dt
import json
import random

from ftcluster.pydoc_data import held_out

FIRST = ("Alice Bruno Chloe Daniel Elena Farid Grace Hugo Ines Jonas Keiko Liam Maya Nadia Oscar Priya Quentin "
         "Rosa Samir Tomas Ursula Victor Wendy Xavier Yara Zoltan Amara Boris Celine Dmitri").split()
LAST = ("Moreau Schmidt Rossi Novak Tanaka Okafor Silva Jensen Kowalski Dubois Haddad Lindqvist Petrov Garcia "
        "Nguyen Fischer Costa Murphy Ivanova Bianchi Sato Mendes Larsen Horvat Ahmed Keller Romano Weber Popescu "
        "Andersen").split()
CITIES = ("Lyon Porto Krakow Osaka Lagos Quito Bergen Graz Leeds Tartu Nantes Bilbao Turin Brno Cork Malmo Ghent "
          "Split Kyoto Pune Accra Lima Perth Halifax Denver Austin Geneva Bremen Utrecht Seville Dresden Tampere "
          "Bologna Izmir Valletta Salzburg Aarhus Cadiz Zagreb Riga").split()
MONTHS = ("January February March April May June July August September October November December").split()

TEMPLATES = (
    "{name} paid {amount} for a hotel room in {city} on {date}.",
    "On {date}, {name} from {city} ordered goods worth {amount}.",
    "Invoice for {name}, {city}: {amount}, dated {date}.",
    "{city}, {date}. Received from {name} the sum of {amount}.",
    "A refund of {amount} was issued to {name} ({city}) on {date}.",
    "{name} signed the lease in {city} on {date} and paid a deposit of {amount}.",
    "Payment of {amount} by {name} was recorded at the {city} branch on {date}.",
    "The {city} office billed {name} {amount} on {date}.",
)

INSTRUCTION = ("Extract the person's name, the city, the date and the amount from the text. Answer with one line "
               'of JSON: {"name": ..., "city": ..., "date": "YYYY-MM-DD", "amount": whole dollars as a number}.')


def _date_text(day: dt.date, style: int) -> str:
    month = MONTHS[day.month - 1]
    return (f"{month} {day.day}, {day.year}", f"{day.day} {month} {day.year}", day.isoformat(),
            f"{month[:3]} {day.day} {day.year}", f"the {day.day} of {month} {day.year}")[style]


def _amount_text(amount: int, style: int) -> str:
    return (f"${amount:,}", f"{amount:,} dollars", f"USD {amount}", f"${amount}.00")[style]


def examples(n: int = 1200, seed: int = 0) -> list[dict]:
    """``n`` examples, the same for a given ``seed`` in every process and Python version."""
    rng = random.Random(seed)
    start = dt.date(2015, 1, 1).toordinal()
    out, seen = [], set()
    while len(out) < n:
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        city = rng.choice(CITIES)
        day = dt.date.fromordinal(start + rng.randrange(4000))
        amount = rng.choice((rng.randrange(5, 100), rng.randrange(100, 5000), rng.randrange(5000, 90000)))
        text = rng.choice(TEMPLATES).format(name=name, city=city, date=_date_text(day, rng.randrange(5)),
                                            amount=_amount_text(amount, rng.randrange(4)))
        if text in seen:
            continue
        seen.add(text)
        answer = json.dumps({"name": name, "city": city, "date": day.isoformat(), "amount": amount})
        out.append({"id": f"extract-{len(out)}", "instruction": INSTRUCTION, "input": text, "output": answer})
    return out


def build(eval_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples."""
    train, evaluation = [], []
    for ex in examples():
        (evaluation if held_out(ex["id"], eval_fraction) else train).append(ex)
    return train, evaluation
