"""The embedded default: an offline, seeded TL;DR-like task that runs the real pipeline on a CPU.

    python -m summarize_from_feedback_details.embedded --out_dir assets/embedded

builds (and reuses on later calls, part by part):
    data/sft/{train,validation,test}.jsonl        fields id, subreddit, title, post, summary (hub schema)
    data/preference/{train,validation}.jsonl      the `openai/summarize_from_feedback` comparisons schema,
                                                  CNN/DM-like rows inside validation (batches of CNNDM_BATCHES)
    tokenizer/                                    byte-level BPE, `<|endoftext|>` = id 0 like Pythia
    models/tiny-pythia-{s,m,l}/                   GPT-NeoX models pre-trained briefly on the corpus

The task. A post has key facts (who: a relation; what: an event; a feeling; the question: an action),
irrelevant filler paragraphs (places, hobbies, food, weather, pets), and sometimes enough filler to need
truncation. `gold_utility(post, summary)` scores a summary: credit for each key fact of the post it
mentions, penalties for irrelevant details, invented facts, verbosity, repetition and a missing final
punctuation. Human references follow a deterministic rule with the writers' habits: more often than not
they tack on an irrelevant detail, sometimes they drop an optional fact (so a policy can beat them).
Synthetic "policies" write the summaries that labellers compare (the supervised ones invent facts as often
as the tiny SFT models do, so the comparisons teach what hallucination costs), and labels follow a
Bradley-Terry model of the utility gap with noise that varies by worker; confidence grows with the gap.

Why the references carry a visible flaw (version 4): a tiny reward model judges style (irrelevant details,
length, structure) as well as the gold labels allow, but it does not learn to check facts against the post
(validation pairs that differ in invented facts: 0.57-0.58 correct against 0.87 for the gold utility, for
tiny-pythia-s after 1 or 4 epochs and for tiny-pythia-m). With near-perfect references the only thing left
for PPO to fix was facts, so it over-optimised the RM (best-of-16 by the RM picked WORSE summaries than a
random sample). With references that, like real TL;DR ones, have a flaw the labellers dislike, SFT imitates
the flaw and PPO removes it while the KL keeps the facts, which is the paper's finding at tiny scale.
CNN/DM-like news articles (org, city, news event, weekday) form the out-of-distribution split.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from summarize_from_feedback_details.core import (
    CNNDM_BATCHES,
    UserInputError,
    atomic_directory,
    run_main,
    write_json,
)

EMBEDDED_VERSION = 4
EOS_TOKEN = "<|endoftext|>"
# The learning rate of SFT and RM on the embedded task (G-1 at tiny scale; the paper's 3e-6 is far too
# small for models trained for minutes).
EMBEDDED_LR = 1e-3
# A known deviation from G-1 at tiny scale: PPO needs a 10x smaller rate. Measured on tiny-pythia-s: PPO at
# 1e-3 or 3e-4 drives the KL above 30 nats and the EOS rate to ~0 within 5 updates, and SFT at 1e-4 for one
# epoch stops at validation loss 1.84 (0.61 at 1e-3) with 20% EOS. The paper's presets share 3e-6.
EMBEDDED_PPO_LR = 1e-4
# A second deviation: the KL coefficient. The tiny RM does not check facts (see the module docstring), so at the
# paper's beta 0.05 PPO also trades facts for style the RM likes. Measured (tiny-pythia-s, 40 x 64 rollouts,
# validation 200 queries, SFT gold utility -0.55): beta 0.05 -> -0.38 (seed 1) and -0.50 (seed 2), KL 2.8 / 2.2
# nats; beta 0.1 -> +0.11 (seed 2), KL 1.1. The pythia preset keeps 0.05.
EMBEDDED_KL_COEF = 0.1
# DPO moves the policy as far from SFT as PPO does, so it shares PPO's rate. Measured (tiny-pythia-s, 1 epoch,
# validation 200 queries at T 0.01, SFT gold utility 0.29): lr 1e-3 degenerates (repeated phrases, gold
# utility -4.65, win rate 0.010), lr 1e-4 gives +1.54 and 0.107 (implicit-reward accuracy 0.72 / 0.70).
EMBEDDED_DPO_LR = 1e-4
VOCAB_SIZE = 2048  # BPE vocabulary limit; the templated corpus saturates below it (every word one token)
EMBEDDING_MULTIPLE = 64  # like Pythia (50,277 tokens in 50,304 rows): the added [PAD] fits without resizing


@dataclass(frozen=True)
class ModelSize:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    pretrain_steps: int
    pretrain_lr: float


# The family of tiny GPT-NeoX (Pythia-architecture) models; bigger ones pre-train to a lower loss.
# 1,000 pre-training steps: the models must learn to copy the post's key facts into a summary, which is what
# makes the later stages meaningful (measured on tiny-pythia-s, then one SFT epoch, greedy, gold utility of
# 100 validation summaries: 250 steps with 15% tl;dr documents -1.86, 600 steps / 50% +0.85, 1,000 / 50% +1.64;
# the references score +3.1). With 250 steps the SFT policy ignored the post and PPO had nothing to improve.
MODEL_SIZES = (
    ModelSize("tiny-pythia-s", 64, 2, 4, pretrain_steps=1000, pretrain_lr=3e-3),
    ModelSize("tiny-pythia-m", 96, 3, 4, pretrain_steps=1000, pretrain_lr=2.5e-3),
    ModelSize("tiny-pythia-l", 128, 4, 4, pretrain_steps=1000, pretrain_lr=2e-3),
)

# Measured length maxima of the default build (Detail 4); the data stage's `embedded` preset uses them.
LENGTHS = dict(
    query=160,
    sft_response=33,
    sft_query_response=192,
    rm_response=51,
    rm_query_response=206,
    cnndm_query=187,
    cnndm_response=24,
    cnndm_query_response=207,
)


@dataclass
class BuildConfig:
    seed: int = 20240317
    """seed of the whole task (posts, labels, tokenizer corpus order, model initialisation)"""
    sft_train: int = 6000
    """SFT train posts (comparisons of the train split are written on these posts)"""
    sft_validation: int = 500
    """SFT validation posts (the preference validation comparisons are written on these)"""
    sft_test: int = 500
    """SFT test posts"""
    preference_train: int = 6000
    """train comparisons"""
    preference_validation: int = 1000
    """TL;DR validation comparisons (on the SFT validation posts)"""
    preference_cnndm: int = 300
    """CNN/DM-like comparisons, stored inside the validation split like the real data"""
    pretrain_seq_len: int = 128
    """tokens per pre-training sequence (documents packed with EOS between them)"""
    pretrain_batch_size: int = 16
    """sequences per pre-training step"""
    pretrain_tldr_share: float = 0.5
    """share of the pre-training posts that end with a `tl;dr:` line (the web text Pythia saw had such posts)"""


# ----------------------------------------------------------------------------------------------
# Vocabulary of the task
# ----------------------------------------------------------------------------------------------
RELATIONS = {  # relation -> pronoun
    "boyfriend": "he", "girlfriend": "she", "husband": "he", "wife": "she", "best friend": "they",
    "roommate": "they", "boss": "they", "coworker": "they", "sister": "she", "brother": "he", "mom": "she",
    "dad": "he", "landlord": "they", "neighbor": "they", "cousin": "they", "fiance": "he",
}
SUBREDDITS = {
    "relationships": ["boyfriend", "girlfriend", "husband", "wife", "fiance"],
    "relationship_advice": ["boyfriend", "girlfriend", "husband", "wife", "best friend"],
    "dating_advice": ["boyfriend", "girlfriend", "fiance"],
    "AskReddit": ["best friend", "roommate", "cousin", "neighbor"],
    "tifu": ["roommate", "brother", "sister", "coworker"],
    "personalfinance": ["dad", "mom", "roommate", "landlord"],
    "legaladvice": ["landlord", "boss", "neighbor"],
    "Advice": ["boss", "coworker", "mom", "dad", "sister", "brother"],
}
SUBREDDIT_WEIGHTS = [40, 12, 8, 10, 7, 6, 6, 11]
EVENTS = [
    "forgot my birthday", "read my private messages", "lied about money", "cancelled our vacation",
    "borrowed my car without asking", "ignored my texts for a week", "kept my security deposit",
    "insulted my cooking", "took credit for my work", "invited my old flame to the party",
    "spent our savings", "skipped my graduation", "posted my photos online", "broke my laptop",
    "moved out without warning", "told my secret to everyone", "stopped paying rent",
    "yelled at me in public", "forgot to pick me up", "lost my house keys", "sold my old guitar",
    "blamed me for the mistake", "ate my leftovers again", "invited strangers over",
    "missed our anniversary", "complained about my friends", "threw away my notes", "changed the locks",
    "refused to split the bill", "crashed my bike", "reported me to management", "hid the bills",
    "quit without telling me", "used my credit card", "canceled my surprise party", "mocked my accent",
]
FEELINGS = [
    "hurt", "angry", "confused", "betrayed", "anxious", "embarrassed", "lonely", "stressed", "jealous",
    "guilty", "frustrated", "exhausted", "heartbroken", "nervous", "disappointed", "overwhelmed",
]
ACTIONS = [
    "end things", "confront them", "move out", "talk to them", "let it go", "ask for an apology",
    "take a break", "call a lawyer", "tell my parents", "find a new job", "ask for my money back",
    "report it", "block their number", "go to therapy", "forgive them", "wait a week",
]
# CNN/DM-like news facts
CITIES = ["denver", "boston", "seattle", "austin", "chicago", "portland", "atlanta", "phoenix", "detroit", "miami"]
ORGS = ["city council", "police department", "school board", "local hospital", "fire department",
        "transit authority", "state court", "water company"]
NEWS_EVENTS = [
    "approved a new budget", "closed the main bridge", "opened an investigation", "hired a new director",
    "announced a hiring freeze", "cancelled the parade", "raised bus fares", "banned fireworks",
    "recalled the mayor", "delayed the election", "settled the lawsuit", "evacuated the stadium",
]
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
# Irrelevant details: a summary that mentions them is penalised.
FILLER_SLOTS = {
    "place": ["gym", "library", "beach", "mall", "bakery", "airport", "stadium", "museum"],
    "hobby": ["painting", "fishing", "chess", "surfing", "knitting", "hiking", "baking", "gardening"],
    "food": ["pizza", "tacos", "sushi", "pancakes", "noodles", "salad", "burgers", "curry"],
    "weather": ["rainy", "sunny", "windy", "foggy", "snowy", "humid"],
    "pet": ["biscuit", "luna", "milo", "pepper", "oscar", "daisy"],
    "color": ["red", "blue", "green", "yellow", "silver", "purple"],
}
FILLER_SENTENCES = [
    "We first met at the {place} a while ago.", "{Pronoun} really likes {hobby} on weekends.",
    "I had {food} for lunch that day.", "It was {weather} outside the whole week.",
    "My cat {pet} was sleeping next to me.", "We usually go to the {place} together.",
    "There was a {color} car parked outside.", "I have been getting into {hobby} lately.",
    "My sister always orders {food} when she visits.", "The weather has been {weather} and gloomy.",
    "Our dog {pet} hates the {place}.", "I painted my room {color} last month.",
    "Some background: I work near the {place}.", "We both love {food}, which is how we bonded.",
]
NEWS_FILLER_SENTENCES = [
    "The {color} building near the {place} was built decades ago.", "Residents said it was {weather} all week.",
    "A spokesperson declined to comment further.", "Local shops near the {place} stayed open.",
    "Officials had discussed the plan at a meeting over {food}.", "Volunteers organised a {hobby} event nearby.",
]
KEY_CATEGORIES: dict[str, tuple[list[str], float]] = {
    # category -> (phrases, credit for mentioning the post's phrase)
    "relation": (list(RELATIONS), 0.75),
    "event": (EVENTS, 1.5),
    "feeling": (FEELINGS, 0.75),
    "action": (ACTIONS, 1.0),
    "city": (CITIES, 0.75),
    "org": (ORGS, 0.75),
    "news_event": (NEWS_EVENTS, 1.5),
    "weekday": (WEEKDAYS, 0.5),
}
FILLER_WORDS = sorted({word for words in FILLER_SLOTS.values() for word in words})
FILLER_PENALTY = 0.75
HALLUCINATION_PENALTY = 1.0
LENGTH_BUDGET_WORDS = 18
LENGTH_PENALTY_PER_WORD = 0.1
REPEAT_PENALTY = 0.5
NO_PUNCTUATION_PENALTY = 0.25
EMPTY_UTILITY = -2.0


def _pattern(phrases: Sequence[str]) -> re.Pattern[str]:
    alternatives = sorted((re.escape(p) for p in phrases), key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(alternatives) + r")\b", re.IGNORECASE)


_KEY_PATTERNS = {name: _pattern(phrases) for name, (phrases, _) in KEY_CATEGORIES.items()}
_FILLER_PATTERN = _pattern(FILLER_WORDS)
_WORD = re.compile(r"[a-z0-9']+")


@functools.lru_cache(maxsize=4096)
def key_facts(text: str) -> dict[str, frozenset[str]]:
    """The key phrases of each category that occur in `text` (a post, a query or a summary)."""
    found = {}
    for name, pattern in _KEY_PATTERNS.items():
        phrases = frozenset(m.group(1).lower() for m in pattern.finditer(text))
        if phrases:
            found[name] = phrases
    return found


def gold_utility_breakdown(post: str, summary: str) -> dict[str, float]:
    """The terms of `gold_utility` (see there)."""
    summary = summary.replace(EOS_TOKEN, " ").replace("[PAD]", " ").strip()
    words = _WORD.findall(summary.lower())
    if not words:
        return {"coverage": 0.0, "filler": 0.0, "hallucination": 0.0, "length": 0.0, "repetition": 0.0,
                "punctuation": 0.0, "empty": EMPTY_UTILITY, "total": EMPTY_UTILITY}
    in_post, in_summary = key_facts(post), key_facts(summary)
    coverage = sum(weight for name, (_, weight) in KEY_CATEGORIES.items() if in_post.get(name, frozenset()) & in_summary.get(name, frozenset()))
    invented = sum(len(phrases - in_post.get(name, frozenset())) for name, phrases in in_summary.items())
    fillers = len(_FILLER_PATTERN.findall(summary))
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    terms = {
        "coverage": coverage,
        "filler": -FILLER_PENALTY * fillers,
        "hallucination": -HALLUCINATION_PENALTY * invented,
        "length": -LENGTH_PENALTY_PER_WORD * max(0, len(words) - LENGTH_BUDGET_WORDS),
        "repetition": -REPEAT_PENALTY * (len(trigrams) - len(set(trigrams))),
        "punctuation": 0.0 if summary[-1] in ".?!" else -NO_PUNCTUATION_PENALTY,
        "empty": 0.0,
    }
    terms["total"] = sum(terms.values())
    return terms


def gold_utility(post: str, summary: str) -> float:
    """The embedded task's known utility of `summary` for `post` (a raw post or a whole query).

    + credit for each key fact of the post the summary mentions (event 1.5, action 1, relation 0.75,
      feeling 0.75; news: event 1.5, org 0.75, city 0.75, weekday 0.5);
    - 0.75 per irrelevant detail (place, hobby, food, weather, pet, colour), - 1 per invented key fact,
      - 0.1 per word beyond 18, - 0.5 per repeated word trigram, - 0.25 without final punctuation;
    an empty summary scores -2. EOS and PAD tokens are ignored. Used as judge-free evaluator and judge.
    """
    return gold_utility_breakdown(post, summary)["total"]


# ----------------------------------------------------------------------------------------------
# Posts, references, policies
# ----------------------------------------------------------------------------------------------
@dataclass
class Facts:
    kind: str  # "reddit" or "news"
    facts: dict[str, str]  # category -> phrase
    pronoun: str = "they"


def _capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _filler_clause(facts: Facts, rng: random.Random) -> str:
    """An irrelevant detail written as a lower-case clause, in the register of the document."""
    templates = NEWS_FILLER_SENTENCES if facts.kind == "news" else FILLER_SENTENCES
    return _filler_sentence(rng, templates, facts.pronoun).rstrip(".").lower()


def _filler_sentence(rng: random.Random, templates: Sequence[str], pronoun: str) -> str:
    slots = {name: rng.choice(words) for name, words in FILLER_SLOTS.items()}
    return rng.choice(templates).format(Pronoun=_capitalize(pronoun), **slots)


def _filler_paragraph(rng: random.Random, templates: Sequence[str], pronoun: str) -> str:
    sentences = [_filler_sentence(rng, templates, pronoun) for _ in range(rng.randint(1, 3))]
    joiner = "\n" if rng.random() < 0.2 else " "  # sometimes a single line break inside a paragraph
    return joiner.join(sentences)


def _filler_count(rng: random.Random) -> int:
    # Mostly short posts, a long tail that needs truncation (Detail 2.2).
    return min(int(rng.expovariate(1 / 1.6)), 12)


def make_reddit_post(rng: random.Random) -> tuple[dict[str, str], Facts]:
    subreddit = rng.choices(list(SUBREDDITS), weights=SUBREDDIT_WEIGHTS)[0]
    relation = rng.choice(SUBREDDITS[subreddit])
    pronoun = RELATIONS[relation]
    facts = {"relation": relation, "event": rng.choice(EVENTS), "feeling": rng.choice(FEELINGS), "action": rng.choice(ACTIONS)}
    me = f"{rng.randint(18, 45)}{rng.choice('FM')}"
    them = f"{rng.randint(18, 45)}{rng.choice('FM')}"
    intro = rng.choice([
        f"I'm {me} and my {relation} is {them}. We have known each other for {rng.randint(1, 9)} years.",
        f"Throwaway because people know me. I ({me}) have a {relation} ({them}).",
        f"So my {relation} ({them}) and I ({me}) have been close for a long time.",
    ])
    event = rng.choice([
        f"Last week {pronoun} {facts['event']}. It was not the first time.",
        f"A few days ago my {relation} {facts['event']}. I did not see it coming.",
        f"Yesterday {pronoun} {facts['event']} and acted like nothing happened.",
    ])
    feeling = rng.choice([
        f"Honestly I feel {facts['feeling']} about all of this.",
        f"I just feel {facts['feeling']} and I can't sleep.",
        f"Right now I am {facts['feeling']} and tired of it.",
    ])
    question = rng.choice([
        f"Should I {facts['action']}? Any advice is welcome.",
        f"Do you think I should {facts['action']}?",
        f"I'm thinking I should {facts['action']}. Is that crazy?",
    ])
    before = [_filler_paragraph(rng, FILLER_SENTENCES, pronoun) for _ in range(rng.random() < 0.3)]
    after = [_filler_paragraph(rng, FILLER_SENTENCES, pronoun) for _ in range(_filler_count(rng))]
    paragraphs = [intro, *before, event, *after[: len(after) // 2], feeling, *after[len(after) // 2 :], question]
    title = rng.choice([
        f"My ({me}) {relation} ({them}) {facts['event']}",
        f"My {relation} {facts['event']}, what now?",
        f"Need advice about my {relation}",
        f"Me [{me}] with my {relation} [{them}], is this normal?",
    ])
    row = {"subreddit": subreddit, "title": title, "post": "\n\n".join(paragraphs)}
    return row, Facts("reddit", facts, pronoun)


def make_news_article(rng: random.Random) -> tuple[str, Facts]:
    facts = {"org": rng.choice(ORGS), "city": rng.choice(CITIES), "news_event": rng.choice(NEWS_EVENTS), "weekday": rng.choice(WEEKDAYS)}
    lede = f"The {facts['org']} in {facts['city']} {facts['news_event']} on {facts['weekday']}, officials said."
    quote = rng.choice(["\"This was a difficult decision,\" one official told reporters.", "Critics called the move rushed."])
    fillers = [_filler_paragraph(rng, NEWS_FILLER_SENTENCES, "they") for _ in range(_filler_count(rng) + 1)]
    return "\n\n".join([lede, quote, *fillers]), Facts("news", facts)


def _summary_from_facts(facts: Facts, keep: dict[str, str | None], filler: str | None = None) -> str:
    """One deterministic sentence form; `keep` maps category -> phrase (None drops it)."""
    if facts.kind == "news":
        org, city, event, day = (keep.get(k) for k in ("org", "city", "news_event", "weekday"))
        subject = f"the {org}" if org else "officials"
        text = f"{subject}{' in ' + city if city else ''} {event or 'made an announcement'}{' on ' + day if day else ''}."
    else:
        relation, event, feeling, action = (keep.get(k) for k in ("relation", "event", "feeling", "action"))
        subject = f"my {relation}" if relation else facts.pronoun
        text = f"{subject} {event or 'did something bad'}"
        text += f" and i feel {feeling}." if feeling else "."
        if action:
            text += f" should i {action}?"
    if filler:
        text = text[:-1] + f", {filler}" + text[-1]
    return " " + text


REFERENCE_FILLER_SHARE = 0.55  # references with an irrelevant detail tacked on (the writers' commonest habit)


def reference_summary(facts: Facts, rng: random.Random) -> str:
    """The human reference: the gold rule with the writers' habits. More often than not they tack on an
    irrelevant detail (-0.75 each and the words count against the length budget), so the SFT policy that imitates
    them does too, and a reward model that learned the labellers' dislike of such details has something to fix:
    the embedded counterpart of references that PPO beats (SPEC: win rates above 50% against references).
    Sometimes they also drop an optional fact."""
    keep: dict[str, str | None] = dict(facts.facts)
    filler = None
    style = rng.random()
    optional = ("feeling", "action") if facts.kind == "reddit" else ("weekday", "city")
    if style < REFERENCE_FILLER_SHARE:
        filler = _filler_clause(facts, rng)
    elif style < REFERENCE_FILLER_SHARE + 0.10:
        keep[optional[0]] = None
    elif style < REFERENCE_FILLER_SHARE + 0.18:
        keep[optional[1]] = None
    elif style < REFERENCE_FILLER_SHARE + 0.23:
        keep[optional[0]] = keep[optional[1]] = None
    return _summary_from_facts(facts, keep, filler)


def _noisy_summary(facts: Facts, rng: random.Random, p_drop: float, p_wrong: float, p_filler: float) -> str:
    keep: dict[str, str | None] = {}
    for name, phrase in facts.facts.items():
        r = rng.random()
        keep[name] = None if r < p_drop else (rng.choice(KEY_CATEGORIES[name][0]) if r < p_drop + p_wrong else phrase)
    filler = _filler_clause(facts, rng) if rng.random() < p_filler else None
    return _summary_from_facts(facts, keep, filler)


def _verbose_summary(facts: Facts, rng: random.Random) -> str:
    text = _summary_from_facts(facts, dict(facts.facts)).rstrip(".?")
    extras = [_filler_clause(facts, rng) for _ in range(rng.randint(1, 2))]
    return text + ", and " + " and ".join(extras) + rng.choice([".", "", " and so on and so on."])


def _extractive_summary(post: str, rng: random.Random) -> str:
    sentences = [s for s in re.split(r"(?<=[.?!])\s+", post.replace("\n", " ")) if s]
    return " " + rng.choice(sentences).lower()


POLICIES: dict[str, Callable[[Facts, str, random.Random, str], str]] = {
    # name -> (facts, post, rng, reference) -> summary; names mimic the real labelling policies
    "ref": lambda facts, post, rng, ref: ref,
    "sup1_t0.7": lambda facts, post, rng, ref: _noisy_summary(facts, rng, 0.2, 0.3, 0.2),
    "sup2_t0.7": lambda facts, post, rng, ref: _noisy_summary(facts, rng, 0.1, 0.2, 0.1),
    "pretrain_t0.7": lambda facts, post, rng, ref: _extractive_summary(post, rng),
    "sup2_ppo_rm1_t0.3": lambda facts, post, rng, ref: _verbose_summary(facts, rng),
    "sup2_bo8_rm1": lambda facts, post, rng, ref: max(
        (_noisy_summary(facts, rng, 0.2, 0.3, 0.2) for _ in range(8)),
        key=lambda s: gold_utility(post, s) + rng.gauss(0, 0.5),
    ),
}
# Each labelling batch compares its own mix of policies, as in the real data.
TRAIN_BATCHES = {
    "batch3": ["sup1_t0.7", "pretrain_t0.7", "ref"],
    "batch4": ["sup1_t0.7", "sup2_t0.7", "ref"],
    "batch5": ["sup2_t0.7", "sup2_ppo_rm1_t0.3", "ref", "pretrain_t0.7"],
    "batch6": ["sup2_t0.7", "sup2_bo8_rm1", "sup2_ppo_rm1_t0.3"],
    "batch7": ["sup1_t0.7", "sup2_t0.7", "sup2_bo8_rm1", "ref"],
    "batch8": list(POLICIES),
}
VALIDATION_BATCHES = {"batch9": list(POLICIES), "batch10": ["sup2_t0.7", "sup2_bo8_rm1", "ref", "sup2_ppo_rm1_t0.3"]}
NEWS_POLICIES = ["ref", "sup1_t0.7", "sup2_t0.7", "pretrain_t0.7"]
NUM_WORKERS = 24


def label_comparison(u0: float, u1: float, worker_noise: float, rng: random.Random) -> tuple[int, int]:
    """Bradley-Terry labeller: prefers summary 1 with probability sigmoid((u1 - u0) / noise); confidence
    1-9 grows with the utility gap (so high-confidence labels are more often right, as in the real data)."""
    p1 = 1.0 / (1.0 + math.exp(-(u1 - u0) / worker_noise))
    choice = int(rng.random() < p1)
    confidence = round(1 + 8 * (1 - math.exp(-abs(u1 - u0) / 1.5)) + rng.gauss(0, 1.2))
    return choice, max(1, min(9, confidence))


def _row_id(rng: random.Random) -> str:
    return "t3_" + "".join(rng.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(6))


def generate_task(config: BuildConfig) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """All raw splits, in the hub schemas: {"sft": {split: rows}, "preference": {split: rows}}."""
    rng = random.Random(config.seed)
    worker_noise = {f"worker_{k}": rng.uniform(0.5, 1.5) for k in range(NUM_WORKERS)}
    sft: dict[str, list[dict[str, Any]]] = {}
    posts: dict[str, list[tuple[dict[str, Any], Facts]]] = {}
    for split, count in (("train", config.sft_train), ("validation", config.sft_validation), ("test", config.sft_test)):
        rows = []
        for _ in range(count):
            row, facts = make_reddit_post(rng)
            row = {"id": _row_id(rng), **row, "summary": reference_summary(facts, rng).strip()}
            rows.append((row, facts))
        posts[split] = rows
        sft[split] = [row for row, _ in rows]

    def comparison(info: dict[str, Any], facts: Facts, text: str, reference: str, batch: str, policies: list[str], split: str) -> dict[str, Any]:
        for _ in range(20):  # two identical texts teach the RM nothing and cap its accuracy: draw again
            names = rng.sample(policies, 2)
            summaries = [POLICIES[name](facts, text, rng, reference) for name in names]
            if summaries[0] != summaries[1]:
                break
        worker = rng.choice(list(worker_noise))
        choice, confidence = label_comparison(gold_utility(text, summaries[0]), gold_utility(text, summaries[1]), worker_noise[worker], rng)
        return {
            "info": info,
            "summaries": [{"text": s, "policy": n, "note": None} for s, n in zip(summaries, names, strict=True)],
            "choice": choice, "worker": worker, "batch": batch, "split": split, "extra": {"confidence": confidence},
        }

    def reddit_comparisons(split: str, count: int, batches: dict[str, list[str]], label: str) -> list[dict[str, Any]]:
        rows = []
        for _ in range(count):
            row, facts = rng.choice(posts[split])
            info = {"id": row["id"], "post": row["post"], "title": row["title"], "subreddit": row["subreddit"], "site": None, "article": None}
            batch = rng.choice(list(batches))
            rows.append(comparison(info, facts, row["post"], " " + row["summary"], batch, batches[batch], label))
        return rows

    preference = {
        "train": reddit_comparisons("train", config.preference_train, TRAIN_BATCHES, "train"),
        "validation": reddit_comparisons("validation", config.preference_validation, VALIDATION_BATCHES, "valid1"),
    }
    for _ in range(config.preference_cnndm):
        article, facts = make_news_article(rng)
        info = {"id": hashlib.sha1(article.encode()).hexdigest()[:16], "post": None, "title": None, "subreddit": None,
                "site": rng.choice(["dailymail", "cnn"]), "article": article}
        reference = reference_summary(facts, rng)
        preference["validation"].append(comparison(info, facts, article, reference, rng.choice(CNNDM_BATCHES), NEWS_POLICIES, "valid2"))
    rng.shuffle(preference["validation"])
    return {"sft": sft, "preference": preference}


# ----------------------------------------------------------------------------------------------
# Building the assets
# ----------------------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _stamp(config: BuildConfig, part: str) -> dict[str, Any]:
    return {"version": EMBEDDED_VERSION, "part": part, "config": dataclasses.asdict(config)}


def _built_stamp(directory: Path) -> dict[str, Any] | None:
    marker = directory / "embedded_stamp.json"
    return json.loads(marker.read_text()) if marker.exists() else None


def _is_built(directory: Path, stamp: dict[str, Any]) -> bool:
    return _built_stamp(directory) == json.loads(json.dumps(stamp))


def _built_with_other_steps(directory: Path, stamp: dict[str, Any]) -> int | None:
    """The step count of a model in `directory` built exactly as `stamp` says except for its pre-training steps."""
    built, wanted = _built_stamp(directory), json.loads(json.dumps(stamp))
    if built is None:
        return None
    steps = built.get("size", {}).pop("pretrain_steps", None)
    wanted["size"].pop("pretrain_steps")
    return steps if built == wanted else None


def pretraining_documents(task: dict[str, Any], seed: int, tldr_share: float) -> list[str]:
    """Raw text the tiny models see as "the internet": posts (some with a tl;dr line) and news articles."""
    rng = random.Random(seed)
    documents = []
    for row in task["sft"]["train"]:
        text = f"{row['title']}\n\n{row['post']}"
        if rng.random() < tldr_share:
            text += f"\n\ntl;dr: {row['summary']}"
        documents.append(text)
    for row in task["preference"]["validation"]:
        if row["info"]["article"]:
            documents.append(row["info"]["article"])
    return documents


def train_tokenizer(documents: Sequence[str], directory: Path) -> Any:
    """Byte-level BPE like GPT-NeoX's: `<|endoftext|>` is id 0 (bos = eos = unk), no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    assert fast.convert_tokens_to_ids(EOS_TOKEN) == 0
    fast.save_pretrained(str(directory))
    return fast


def embedding_rows(num_tokens: int) -> int:
    """Embedding rows for a tokenizer of `num_tokens`: room for the [PAD] added later, rounded up like Pythia."""
    return -(-(num_tokens + 1) // EMBEDDING_MULTIPLE) * EMBEDDING_MULTIPLE


def model_config(size: ModelSize, num_tokens: int) -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=embedding_rows(num_tokens),
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        intermediate_size=4 * size.hidden_size,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        use_parallel_residual=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def pretrain_model(size: ModelSize, tokenizer: Any, documents: Sequence[str], config: BuildConfig, directory: Path) -> dict[str, Any]:
    """Pre-train one tiny GPT-NeoX as a causal LM on the packed corpus; returns its final loss and timing."""
    import torch
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(config.seed)
    start = time.time()
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer.encode(document) + [tokenizer.eos_token_id])
    seq = config.pretrain_seq_len
    data = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    model = GPTNeoXForCausalLM(model_config(size, len(tokenizer)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr, weight_decay=0.01)
    warmup = max(1, size.pretrain_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / size.pretrain_steps))
    )
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    for _ in range(size.pretrain_steps):
        batch = data[torch.randint(len(data), (config.pretrain_batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    tail = losses[-20:]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_steps": size.pretrain_steps,
        "final_loss": round(sum(tail) / len(tail), 4),
        "first_loss": round(losses[0], 4),
        "corpus_tokens": len(ids),
        "seconds": round(time.time() - start, 1),
    }


def ensure_built(
    out_dir: str | Path = "assets/embedded", config: BuildConfig | None = None, force: bool = False,
    sizes: Sequence[str] | None = None, pretrain_steps: int | None = None,
) -> dict[str, Any]:
    """Build whatever part of the embedded assets is missing or stale; returns the manifest.

    `sizes` names the models to pre-train (default: every size of MODEL_SIZES); data and tokenizer are
    always built. `pretrain_steps` replaces every size's own step count (quick builds and the tests' size
    comparison) and rebuilds a model pre-trained for another count; without it, a model already built with
    another count is reused as it is, with one line saying so (its count is in its stamp and the manifest)."""
    import torch

    config = config or BuildConfig()
    known = [size.name for size in MODEL_SIZES]
    unknown = sorted(set(sizes or ()) - set(known))
    if unknown:
        raise UserInputError(f"unknown embedded model size(s) {unknown}: choose from {known}")
    if pretrain_steps is not None and pretrain_steps < 1:
        raise UserInputError(f"--pretrain_steps {pretrain_steps}: give a positive step count, or leave it out for each size's own "
                         f"({', '.join(f'{size.name} {size.pretrain_steps}' for size in MODEL_SIZES)})")
    wanted = [dataclasses.replace(size, pretrain_steps=pretrain_steps or size.pretrain_steps)
              for size in MODEL_SIZES if sizes is None or size.name in sizes]
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() and not force else {}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    task = None

    def get_task() -> dict[str, Any]:
        nonlocal task
        if task is None:
            task = generate_task(config)
        return task

    start = time.time()
    data_dir = out / "data"
    if force or not _is_built(data_dir, _stamp(config, "data")):
        t0 = time.time()
        with atomic_directory(data_dir) as tmp:
            for dataset, splits in get_task().items():
                (tmp / dataset).mkdir()
                for split, rows in splits.items():
                    _write_jsonl(tmp / dataset / f"{split}.jsonl", rows)
            write_json(tmp / "embedded_stamp.json", _stamp(config, "data"))
        manifest["data"] = {"seconds": round(time.time() - t0, 1), **{d: {s: len(r) for s, r in sp.items()} for d, sp in get_task().items()}}
        print(f"embedded: wrote the task data to {data_dir} ({manifest['data']['seconds']} s)")

    from transformers import AutoTokenizer

    tokenizer_dir = out / "tokenizer"
    documents = None
    if force or not _is_built(tokenizer_dir, _stamp(config, "tokenizer")):
        t0 = time.time()
        documents = pretraining_documents(get_task(), config.seed, config.pretrain_tldr_share)
        with atomic_directory(tokenizer_dir) as tmp:
            train_tokenizer(documents, tmp)
            write_json(tmp / "embedded_stamp.json", _stamp(config, "tokenizer"))
        manifest["tokenizer"] = {"seconds": round(time.time() - t0, 1), "tokens": len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))}
        print(f"embedded: trained the tokenizer ({manifest['tokenizer']['seconds']} s)")

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    manifest.setdefault("models", {})
    for size in wanted:
        model_dir = out / "models" / size.name
        stamp = {**_stamp(config, "model"), "size": dataclasses.asdict(size)}
        if not force and _is_built(model_dir, stamp):
            continue
        built_steps = _built_with_other_steps(model_dir, stamp)
        if not force and pretrain_steps is None and built_steps is not None:
            print(f"embedded: reusing {size.name} pre-trained for {built_steps} steps (its own count is {size.pretrain_steps}: "
                  f"--pretrain_steps {size.pretrain_steps} rebuilds it)")
            continue
        documents = documents or pretraining_documents(get_task(), config.seed, config.pretrain_tldr_share)
        with atomic_directory(model_dir) as tmp:
            manifest["models"][size.name] = pretrain_model(size, tokenizer, documents, config, tmp)
            write_json(tmp / "embedded_stamp.json", stamp)
        print(f"embedded: pre-trained {size.name}: {json.dumps(manifest['models'][size.name])}")

    manifest.update(version=EMBEDDED_VERSION, config=dataclasses.asdict(config))
    manifest["last_call_seconds"] = round(time.time() - start, 1)
    write_json(manifest_path, manifest)
    return manifest


@dataclass
class BuildArgs:
    out_dir: str = "assets/embedded"
    """where the embedded assets are written (reused part by part when already built)"""
    force: bool = False
    """rebuild everything even if it is already built"""
    sizes: tuple[str, ...] = tuple(size.name for size in MODEL_SIZES)
    """the model sizes to pre-train (each takes 1-3 minutes on 2 CPU cores)"""
    pretrain_steps: int | None = None
    """pre-training steps of every size (default: each size's own, 1,000); fewer for a quick look"""
    config: BuildConfig = dataclasses.field(default_factory=BuildConfig)


if __name__ == "__main__":
    import tyro

    def build(args: BuildArgs) -> None:
        print(json.dumps(ensure_built(args.out_dir, args.config, args.force, args.sizes, args.pretrain_steps), indent=2))

    run_main(build, tyro.cli(BuildArgs, description="Build the embedded offline TL;DR-like task.", use_underscores=True))
