"""A built-in synthetic intent-classification task whose clients need personalisation.

Why it exists: the toolkit must run offline out of the box, and its point (per-client LoRA experts)
only shows on data where one global model is not enough. This generator is that data set.

Design:

* Five domains (``hospital``, ``bank``, ``school``, ``airline``, ``hotel``), each with four intents.
  Labels are prefixed by their domain (``hospital.cancel_appointment``), so the global label set is the
  union of all domains' intents (20 labels).
* About 70% of a domain's examples are *specific*: templates filled with that domain's vocabulary
  (doctors, departments, cards, flights, courses, rooms...), so the domain and the intent are plain.
* About 30% (:data:`SHARED_SHARE`) are *shared* phrasings with no domain word at all, drawn from
  three families (cancel, status, money) that exist in every domain with the same small phrase set.
  "I need to cancel it" is ``hospital.cancel_appointment`` for a hospital client, ``bank.block_card``
  for a bank client, ``airline.cancel_flight`` for an airline client and so on. The very same text
  thus carries different labels in different domains: a single global model can at best guess the
  domain, while a model personalised to its client (its domain) resolves it fully.
* Texts are short (at most 20 words), so 32 tokens suffice.
* Extra columns: ``domain`` (for ``column:domain`` partitions) and ``phrasing`` (``shared`` or
  ``specific``, to report accuracy on the ambiguous part separately).

Generation is seeded per domain (``numpy.random.default_rng([seed, domain_number])``): the same seed
gives an identical dataset, another seed other texts, and a domain's examples do not change when other
domains are added or left out.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgemole.data.dataset import TextDataset
from edgemole.errors import ConfigError

SHARED_SHARE = 0.30

# Phrasings used verbatim by every domain; the family decides which of the domain's intents they mean.
_SHARED_PHRASES: dict[str, tuple[str, ...]] = {
    "cancel": (
        "I need to cancel it",
        "please cancel it for me",
        "cancel it, my plans changed",
        "I won't need it anymore, can you cancel it",
        "can you call the whole thing off",
        "I changed my mind, cancel it please",
        "something came up so I have to cancel",
        "how do I cancel this",
    ),
    "status": (
        "is it ready yet",
        "any update on it",
        "I am still waiting, what is going on",
        "how much longer will it take",
        "when will I hear back about it",
        "what is the status of my request",
        "it has been days and nothing has happened",
        "can you check where things stand",
    ),
    "money": (
        "why was I charged twice",
        "how much do I still owe",
        "I think the amount is wrong",
        "can I get my money back",
        "there is a charge I do not recognise",
        "what is this fee for",
        "the price I paid is not what I was told",
        "I was billed for something I never got",
    ),
}
_SHARED_OPENERS: tuple[str, ...] = ("", "hi, ", "sorry, ")

# Slot fillers available to every domain's specific templates.
_COMMON_SLOTS: dict[str, tuple[str, ...]] = {
    "when": ("today", "tomorrow", "on monday", "next week", "this afternoon", "on friday", "tonight"),
    "past": ("last week", "two days ago", "on tuesday", "this morning", "yesterday", "a month ago"),
    "open": ("", "", "hi, ", "hello, ", "excuse me, ", "good morning, "),
    "close": ("", "", " please", ", thanks", ", thank you"),
}


@dataclass(frozen=True)
class _Domain:
    shared: Mapping[str, str]  # shared phrase family -> this domain's intent
    intents: Mapping[str, tuple[str, ...]]  # intent -> specific templates
    slots: Mapping[str, tuple[str, ...]]


_DOMAINS: dict[str, _Domain] = {
    "hospital": _Domain(
        shared={"cancel": "cancel_appointment", "status": "test_results", "money": "billing"},
        intents={
            "cancel_appointment": (
                "{open}I have to cancel my appointment with {doctor} {when}{close}",
                "{open}please cancel my {dept} checkup {when}",
                "{open}I can't make my visit to the {dept} clinic {when}, cancel it",
                "{open}remove my booking with {doctor}, I feel better now{close}",
            ),
            "test_results": (
                "{open}are my {test} results back yet{close}",
                "{open}when will {doctor} send me my {test} results",
                "{open}I did a {test} {past}, any news from the lab",
                "{open}can I see the lab report for my {test}{close}",
            ),
            "billing": (
                "{open}my hospital bill for the {test} looks too high",
                "{open}does my insurance cover the {dept} visit{close}",
                "{open}I got an invoice from the {dept} clinic that I don't understand",
                "{open}how do I pay the hospital bill for my {test}{close}",
            ),
            "refill_prescription": (
                "{open}I am running out of my {medicine}, I need a refill{close}",
                "{open}can {doctor} renew my prescription for {medicine}",
                "{open}please send a new prescription for {medicine} to my pharmacy",
                "{open}my {medicine} prescription expired {past}",
            ),
        },
        slots={
            "doctor": ("Dr. Patel", "Dr. Okafor", "Dr. Lindqvist", "Dr. Moreau", "Dr. Tanaka", "Dr. Alvarez"),
            "dept": ("cardiology", "dermatology", "pediatrics", "orthopedics", "radiology", "eye"),
            "test": ("blood test", "x-ray", "MRI scan", "allergy test", "urine test", "ECG"),
            "medicine": ("insulin", "inhaler", "blood pressure pills", "antibiotics", "thyroid medication"),
        },
    ),
    "bank": _Domain(
        shared={"cancel": "block_card", "status": "transfer_status", "money": "dispute_charge"},
        intents={
            "block_card": (
                "{open}I lost my {card}, please block it{close}",
                "{open}freeze my {card} right away, it was stolen {past}",
                "{open}someone used my {card} at {shop}, stop the card",
                "{open}how do I block my {card} in the app{close}",
            ),
            "transfer_status": (
                "{open}my transfer of {amount} to {person} has not arrived",
                "{open}the wire I sent {past} is still pending{close}",
                "{open}did the {amount} payment to my savings account go through",
                "{open}why is my bank transfer to {person} taking so long",
            ),
            "dispute_charge": (
                "{open}there is a {amount} payment to {shop} on my statement I never made",
                "{open}{shop} took {amount} from my {card} twice",
                "{open}I want to dispute a card payment from {past}{close}",
                "{open}my account shows a {amount} debit from {shop} I don't know",
            ),
            "open_account": (
                "{open}I would like to open a {account}{close}",
                "{open}what documents do I need for a {account}",
                "{open}can I open a {account} online {when}",
                "{open}how long does it take to set up a {account} for my son",
            ),
        },
        slots={
            "card": ("debit card", "credit card", "visa card", "bank card", "mastercard"),
            "shop": ("a gas station", "an online store", "the supermarket", "a hotel in Madrid", "Amazon"),
            "amount": ("50 euros", "200 dollars", "1,000 pounds", "75 dollars", "320 euros"),
            "person": ("my landlord", "my sister", "a friend abroad", "my employer", "the car dealer"),
            "account": ("savings account", "joint account", "checking account", "student account",
                        "business account"),
        },
    ),
    "school": _Domain(
        shared={"cancel": "drop_course", "status": "exam_results", "money": "tuition_fees"},
        intents={
            "drop_course": (
                "{open}I want to drop the {subject} course this semester{close}",
                "{open}how do I withdraw from {teacher}'s {subject} class",
                "{open}please unenroll me from {subject} before the deadline",
                "{open}can I still drop {subject} {when} without a penalty",
            ),
            "exam_results": (
                "{open}when will the {subject} exam grades be posted",
                "{open}is my {exam} score for {subject} out yet{close}",
                "{open}{teacher} said the {exam} results come {when}, are they online",
                "{open}I took the {subject} {exam} {past}, where can I see my grade",
            ),
            "tuition_fees": (
                "{open}when is the tuition payment for next semester due",
                "{open}can I pay the school fees for {subject} in installments{close}",
                "{open}the tuition invoice includes a lab fee for {subject} I did not take",
                "{open}is there a scholarship that covers the {subject} course fee",
            ),
            "report_absence": (
                "{open}my son will miss {teacher}'s class {when}, he is sick",
                "{open}I need to report that my daughter is absent {when}{close}",
                "{open}she will not attend the {subject} lesson {when} due to a doctor visit",
                "{open}how do I excuse an absence from {subject} {past}",
            ),
        },
        slots={
            "subject": ("chemistry", "calculus", "history", "biology", "French", "computer science",
                        "art"),
            "teacher": ("Mr. Kowalski", "Ms. Haddad", "Professor Chen", "Mrs. Brennan", "Mr. Santos"),
            "exam": ("midterm", "final exam", "quiz", "lab exam", "oral exam"),
        },
    ),
    "airline": _Domain(
        shared={"cancel": "cancel_flight", "status": "flight_status", "money": "refund_request"},
        intents={
            "cancel_flight": (
                "{open}please cancel my flight to {city} {when}{close}",
                "{open}I can no longer travel, cancel booking {code}",
                "{open}how do I cancel my return flight from {city}",
                "{open}cancel the {cabin} ticket I booked for {city}{close}",
            ),
            "flight_status": (
                "{open}is flight {flight} to {city} on time{close}",
                "{open}has the {flight} from {city} been delayed",
                "{open}which gate does my flight to {city} leave from {when}",
                "{open}what time does flight {flight} land in {city}",
            ),
            "refund_request": (
                "{open}my flight to {city} was cancelled, I want a refund{close}",
                "{open}I paid for a {cabin} seat but flew economy, refund the difference",
                "{open}when will I get the refund for booking {code}",
                "{open}can I get my ticket money back for the {city} trip",
            ),
            "lost_baggage": (
                "{open}my suitcase did not arrive in {city}{close}",
                "{open}the airline lost my luggage on flight {flight}",
                "{open}where is my checked bag from the {city} flight",
                "{open}my bag came off the carousel in {city} damaged",
            ),
        },
        slots={
            "city": ("Lisbon", "Toronto", "Nairobi", "Osaka", "Berlin", "Lima", "Dubai", "Oslo"),
            "flight": ("LX 318", "AF 1042", "KL 605", "BA 287", "TK 1821"),
            "code": ("QX7P2M", "HB4RT9", "ZK92LA", "MM31VD"),
            "cabin": ("business class", "first class", "premium economy", "window"),
        },
    ),
    "hotel": _Domain(
        shared={"cancel": "cancel_reservation", "status": "room_status", "money": "bill_dispute"},
        intents={
            "cancel_reservation": (
                "{open}please cancel my reservation for the {room} {when}{close}",
                "{open}I need to cancel my {nights} stay at your hotel",
                "{open}can I cancel the {room} booking without paying a fee",
                "{open}we won't come {when}, cancel the hotel booking{close}",
            ),
            "room_status": (
                "{open}is my {room} ready for check-in yet",
                "{open}can I check in early to the {room}{close}",
                "{open}we arrived at the hotel, when will room {number} be cleaned",
                "{open}the front desk said the {room} is not ready, how long",
            ),
            "bill_dispute": (
                "{open}my hotel bill has a {item} charge I didn't use",
                "{open}why does my room {number} invoice include the {item}",
                "{open}I was charged for {nights} but only stayed one night",
                "{open}please remove the {item} from my hotel bill{close}",
            ),
            "room_service": (
                "{open}can you send {food} to room {number}{close}",
                "{open}I would like to order {food} to my room {when}",
                "{open}is room service still open, I want {food}",
                "{open}please bring extra towels and {food} to room {number}",
            ),
        },
        slots={
            "room": ("double room", "suite", "single room", "sea view room", "family room"),
            "nights": ("two nights", "three nights", "a week", "four nights"),
            "number": ("214", "305", "1102", "87", "640"),
            "item": ("minibar", "spa", "parking", "late checkout", "laundry"),
            "food": ("breakfast", "a club sandwich", "coffee", "a bottle of wine", "fruit"),
        },
    ),
}

SYNTHETIC_DOMAINS: tuple[str, ...] = tuple(_DOMAINS)

_FORMATTER = string.Formatter()


def _fill(template: str, slots: Mapping[str, Sequence[str]], rng: np.random.Generator) -> str:
    values: dict[str, str] = {}
    for _, name, _, _ in _FORMATTER.parse(template):
        if name and name not in values:
            options = slots[name]
            values[name] = options[int(rng.integers(len(options)))]
    text = template.format(**values)
    return text[0].upper() + text[1:]


def _make_domain(name: str, number: int, n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    domain = _DOMAINS[name]
    rng = np.random.default_rng([seed, number])
    slots = {**_COMMON_SLOTS, **domain.slots}
    families = sorted(domain.shared)
    intents = sorted(domain.intents)
    n_shared = round(SHARED_SHARE * n)
    texts: list[str] = []
    labels: list[str] = []
    phrasing: list[str] = []
    for j in range(n):
        if j < n_shared:
            family = families[int(rng.integers(len(families)))]
            phrases = _SHARED_PHRASES[family]
            opener = _SHARED_OPENERS[int(rng.integers(len(_SHARED_OPENERS)))]
            text = opener + phrases[int(rng.integers(len(phrases)))]
            texts.append(text[0].upper() + text[1:])
            labels.append(f"{name}.{domain.shared[family]}")
            phrasing.append("shared")
        else:
            intent = intents[int(rng.integers(len(intents)))]
            templates = domain.intents[intent]
            texts.append(_fill(templates[int(rng.integers(len(templates)))], slots, rng))
            labels.append(f"{name}.{intent}")
            phrasing.append("specific")
    order = rng.permutation(n)
    return [texts[i] for i in order], [labels[i] for i in order], [phrasing[i] for i in order]


def make_synthetic(n_per_domain: int = 200, seed: int = 0,
                   domains: Sequence[str] | None = None) -> TextDataset:
    """Generate the synthetic task: ``n_per_domain`` examples for each of ``domains`` (default: all).

    Examples are grouped by domain in the order given; columns ``domain`` and ``phrasing`` are added.
    """
    chosen = list(SYNTHETIC_DOMAINS if domains is None else domains)
    if not chosen:
        raise ConfigError("synthetic data needs at least one domain")
    for name in chosen:
        if name not in _DOMAINS:
            available = ", ".join(SYNTHETIC_DOMAINS)
            raise ConfigError(f"unknown synthetic domain {name!r} (available: {available})")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"synthetic domains listed twice: {', '.join(chosen)}")
    if n_per_domain < 1:
        raise ConfigError(f"synthetic data needs at least 1 example per domain, got {n_per_domain}")
    texts: list[str] = []
    labels: list[str] = []
    domain_col: list[str] = []
    phrasing_col: list[str] = []
    for name in chosen:
        t, lab, ph = _make_domain(name, SYNTHETIC_DOMAINS.index(name), n_per_domain, seed)
        texts += t
        labels += lab
        phrasing_col += ph
        domain_col += [name] * n_per_domain
    return TextDataset(texts=texts, labels=labels, columns={"domain": domain_col, "phrasing": phrasing_col})
