"""The self-study set: which questions LIFT asks itself about a document, and what it answers,
written by rules from the document's own text (--distill N, --study; our extension, METHOD.md §9).
No model here: distill.py turns these pairs into training examples, eval.py and summary.py score
against them, train.py --show-study prints them and --route reads a user's question with them.

Each kind of question (--study):

- names (--study quote, the default): for up to N names in the document, "What does the text
  say about <name>?" answered `The text says: "<the first sentence naming it>"`, with
  cross-entropy (auxiliary QA whose pairs a rule writes, so every answer is true);
- or blanks (--study cloze): up to N names *and numbers*, each asked the other way round, from
  its sentence to it: `Fill in the blank from the text: "<the sentence, the name → ___>"`,
  answered with the name or number. A user's question gives the sentence's other words and
  asks for the name ("Who founded the town band?"); the quote asks the name for the sentence.
  A model that learns "A is B" does not thereby answer "B is?" (the "reversal curse"), so the
  direction studied might matter. Measured on the demo's prose (results/NOTEBOOK.md, "The
  same recipe on the demo's prose"), it does not help: the blanks are learnt and the user's
  questions still miss them (2 of 12 answered, against 4 with every name quoted);
- or both (--study both): up to N of each, every fact asked in two phrasings and both
  directions, to test whether a fact studied more than one way reaches a third phrasing;
- or keys (--study keys): every sentence quoted under many keys and many phrasings. A user
  asks a fact by the sentence's *other* words ("Who founded the town band?" for "The town
  band was founded … by a clockmaker named Ferdinand Oakes"), and an adapter trained on one
  question form learns that form, not the fact (results/NOTEBOOK.md). So each distinctive
  word of the document (a name, a number, or a word that few sentences use) becomes a key to
  the first sentence that has it, asked in one of KEY_QUESTIONS' phrasings in turn: "What do
  we learn about "warden" from the text?" → `The text says: "The first frost warden was …"`. This is
  the augmentation that lets fine-tuned facts be retrieved by other questions (several
  phrasings of each fact; Allen-Zhu & Li's "Physics of Language Models", part 3.1);
- or phrases (--study phrases): as keys, but each key asked inside its own words, the
  PHRASE_WORDS words on each side of it in its sentence ("What happened with The contents
  of the, according to the text?"). On the licences a user's question held the very word
  studied as a key and still missed: the key was studied alone in quotes, the user writes it
  among the sentence's other words (results/NOTEBOOK.md, "The address gap"). `route` asks,
  in place of a user's question, the study's question on a key the user's question holds;
- or clauses (--study clauses): as phrases, but each key answered with its clause, not its
  whole sentence: from the clause mark (, ; : or a bracket) before the key's phrase, at most
  CLAUSE_WORDS words. An answer is read in the reply's first tokens (32 in the benchmarks), and
  a licence's sentence is often a whole clause of the licence: of Apache's 21 questions, a
  studied sentence gave the answer within 32 tokens for 7, a studied clause for 11 (eval.py
  run's summary; results/NOTEBOOK.md, "Each key answered from its clause");
- with --phrasings K, every quoting question (quote, keys, phrases, clauses, both) in K of those wordings: a
  fact studied in one wording is stored for that wording only, by Gated Memory and LoRA alike
  (storage.py measures it);
- with --reply plain, every quoting question answered with the sentence alone, not quoted. A
  model answers a user's question directly ("The secret number of the amber badger is …"),
  and a fact studied only inside a quote came back only after `The text says: "`
  (results/NOTEBOOK.md, "Needles from parameters alone with Gated Memory");
- with --reply restate, answered from the question's own words on: the reply starts where the
  asked key (or phrase) starts in its sentence or clause ("defined by Sections 1 through 9 of
  this document."). Its first words are a copy of the question, which reading does well, and
  the rest continues the document from those words, which the windows trained. A clause
  reply starts up to CLAUSE_BACK words earlier, words the question does not hold, so the
  memory must first recall which clause is asked; that is where Gated Memory fell back on a
  studied clause form while LoRA, which restates the question as the base model does, did not.
  Measured on the licences, Gated Memory learnt the form and not the clauses: it restated as
  often as LoRA and answered fewer, right only where the user's words were the licence's
  (results/NOTEBOOK.md, "Replies that restate the question").
"""
from __future__ import annotations

import re
from collections import Counter

from data import DataConfig, sentences

QUESTION = "What does the text say about {}?"
REPLY = 'The text says: "{}"'     # the answer to QUESTION: the document's own sentence, quoted
PLAIN = "{}"                       # or, with --reply plain, the sentence alone: the form of a user's answer
# (or, with --reply restate, the sentence from the question's key on: onward() below)
CLOZE = 'Fill in the blank from the text: "{}"'   # --study cloze: the sentence, its name or number → ___
BLANK = "___"
# The wordings of a quoting question, all answered with REPLY (or PLAIN): --study keys asks each
# key in the next one in turn, --phrasings K asks every question in K of them (results/NOTEBOOK.md:
# "One wording stores a prompt, several store a fact").
KEY_QUESTIONS = (QUESTION, "What do we learn about {} from the text?",
                 "Tell me what the text says about {}.", "Who or what is connected with {} in the text?",
                 "What happened with {}, according to the text?", "Which names and numbers go with {} in the text?")
# Words too common to point at one sentence; with "a word few sentences use" (KEY_SENTENCES).
FUNCTION_WORDS = set("""about above after again against also among because been before being below between both
could does doing down during each every from further have having here into itself more most much once only other
over same should some such than that their them then there these they this those through under until upon very
were what when where which while whom will with would your year years""".split())
KEY_SENTENCES = 3                  # a word in more sentences than this is not a key to any of them
KEYS_PER_SENTENCE = 4              # the most keys one sentence is asked by
PHRASE_WORDS = 2                   # --study phrases: the words kept on each side of a key
CLAUSE_BACK = 8                    # --study clauses: a clause mark this many words before the phrase, at most
CLAUSE_WORDS = 30                  # ... and the reply's length in words, at most
# A name: a run of capitalised words ("Theswyn Kaaridun", "Seven Sisters Bridge").
RUN = re.compile(r"[A-Z][\w'-]+(?: [A-Z][\w'-]+)*")
# A number of two digits or more, with thousands commas ("1,240", "1743"; "Chapter 1" is no fact).
NUMBER = re.compile(r"\b\d[\d,]*\d\b")


def mention(name: str, sentence: str):
    """Where `sentence` mentions `name` (a match, or None): a name anywhere, a number only whole
    ("86" is not in "1,860")."""
    return re.search(rf"(?<![\w,]){re.escape(name)}(?!\w|,\d)" if name[0].isdigit() else re.escape(name), sentence)


def names(text: str) -> list[str]:
    """Distinct names in order of first appearance. Leading words that the text also uses in lower
    case are ordinary words capitalised at a sentence start ("The", "In") and are dropped; a
    single word that is part of a longer name is dropped too (its full name covers it)."""
    lower = set(re.findall(r"\b[a-z][\w'-]*", text))
    seen: dict[str, None] = {}
    for m in RUN.finditer(text):
        words = m.group(0).split()
        while words and words[0].lower() in lower:
            words = words[1:]
        if words:
            seen.setdefault(" ".join(words), None)
    parts = {w for n in seen if " " in n for w in n.split()}
    return [n for n in seen if " " in n or n not in parts]


def spread(items: list, limit: int) -> list:
    """At most `limit` of `items`, evenly spread over the list (so over the whole document)."""
    return items if len(items) <= limit else [items[round(i * (len(items) - 1) / max(1, limit - 1))] for i in range(limit)]


def statements(text: str, limit: int, numbers: bool = False, distinct: bool = False) -> list[tuple[str, str]]:
    """(name, the first sentence of the text that names it) for up to `limit` names (and, with
    `numbers`, numbers, in order of first appearance), spread evenly over the text. distinct
    (--study sentences): each sentence under its first name only. In a licence seven capitalised
    words ("MERCHANTABILITY", "KIND", …) name one disclaimer, which the quote study set then asks
    28 of 108 times, and the adapter gave it as 11 of its 21 LIFT+ICL answers (results/NOTEBOOK.md)."""
    found = names(text)
    if distinct:
        told = [s for s in sentences(text) if len(s.split()) > 3]
        first = {n: next((s for s in told if mention(n, s)), None) for n in found}
        once = {s: n for n, s in reversed(first.items()) if s is not None}        # a sentence → its first name
        return [(n, first[n]) for n in spread([n for n in first if once.get(first[n]) == n], limit)]
    if numbers:                                              # each name or number at its first position
        first = {n: text.find(n) for n in found} | {m.group(0): m.start() for m in reversed(list(NUMBER.finditer(text)))}
        found = sorted(first, key=first.get)
    found = spread(found, limit)                             # keep names from the whole document
    told = [s for s in sentences(text) if len(s.split()) > 3]   # a heading ("Chapter 10.") states nothing
    return [(name, next(s for s in told if mention(name, s))) for name in found if any(mention(name, s) for s in told)]


def blanked(sentence: str, name: str) -> str:
    """`sentence` with its first mention of `name` replaced by the blank."""
    m = mention(name, sentence)
    return sentence[:m.start()] + BLANK + sentence[m.end():]


def keys(text: str) -> list[tuple[str, str]]:
    """(key, its sentence) for --study keys, KEYS_PER_SENTENCE per sentence at most, in the text's
    order. A sentence's keys: the names and numbers it is the first to mention, then the words it
    is the first to use (four letters or more, no function word) that the fewest of the text's
    sentences use, longest first, if at most KEY_SENTENCES do. A word is quoted in the question
    ("warden" → `about "warden"`), a name or number is not."""
    told = [s for s in sentences(text) if len(s.split()) > 3]   # a heading states nothing
    words = [list(dict.fromkeys(re.findall(r"\b[a-z]+\b", s))) for s in told]   # in order: equal keys keep it
    used = Counter(w for ws in words for w in ws)
    known = names(text)
    seen, out = set(), []
    for s, ws in zip(told, words):
        named = [n for n in known if n not in seen and mention(n, s)] + \
                [n for n in NUMBER.findall(s) if n not in seen]
        rare = sorted((w for w in ws if w not in seen and len(w) >= 4 and w not in FUNCTION_WORDS
                       and used[w] <= KEY_SENTENCES), key=lambda w: (used[w], -len(w)))
        for k in (named + rare)[:KEYS_PER_SENTENCE]:
            out.append((f'"{k}"' if k[0].islower() else k, s))
        seen.update(named + rare)                               # a key points at its first sentence only
    return out


def phrase(key: str, sentence: str) -> str:
    """`key` with the PHRASE_WORDS words on each side of its first place in `sentence`, the way a
    user's question quotes a sentence's words: "contents" → "The contents of the"."""
    bare = lambda w: re.sub(r"^\W+|\W+$", "", w)           # a word without its quotes, brackets, commas
    words, first = [w for w in map(bare, sentence.split()) if w], key.strip('"').split()
    at = next((i for i, w in enumerate(words) if w == first[0]), None)   # case counts, as in keys()
    if at is None:                                           # a key is a word of its sentence; safe all the same
        return key.strip('"')
    return " ".join(words[max(0, at - PHRASE_WORDS):at + len(first) + PHRASE_WORDS])


def clause(key: str, sentence: str) -> str:
    """The part of `sentence` that --study clauses answers `key` with: from just after the last
    clause mark (a word ending in , ; or :, or starting with a bracket) at most CLAUSE_BACK words
    before the key's phrase (else from the phrase itself, or from the sentence's start), then
    CLAUSE_WORDS words at most. A key not in the sentence gets the sentence's first words."""
    bare = lambda w: re.sub(r"^\W+|\W+$", "", w)
    words, first = sentence.split(), key.strip('"').split()[0]
    at = max(0, next((i for i, w in enumerate(words) if bare(w) == first), 0) - PHRASE_WORDS)   # the phrase's start
    marks = [i for i in range(max(0, at - CLAUSE_BACK), at + 1)
             if i == 0 or re.search(r"[,;:]$", words[i - 1]) or words[i].startswith(("(", "["))]
    start = marks[-1] if marks else at                          # the nearest clause start before the phrase
    return " ".join(words[start:start + CLAUSE_WORDS])


def onward(key: str, statement: str) -> str:
    """`statement` from the first place where its words hold `key`'s words in a row (quotes,
    brackets and commas aside; case counts), else whole: the reply of --reply restate."""
    bare = lambda w: re.sub(r"^\W+|\W+$", "", w)
    words = statement.split()
    kept = [i for i, w in enumerate(words) if bare(w)]               # the places of real words
    said, asked = [bare(words[i]) for i in kept], [w for w in map(bare, key.split()) if w]
    at = next((kept[j] for j in range(len(said)) if said[j:j + len(asked)] == asked), 0) if asked else 0
    return " ".join(words[at:])


def studied_keys(text: str, cfg: DataConfig) -> list[tuple[str, str]]:
    """(key, sentence) for each quoting self-study question of --study (none for cloze): the name,
    number or word a question asks about, and the sentence that answers it."""
    if cfg.study in ("keys", "phrases", "clauses"):
        return spread(keys(text), cfg.distill)
    return statements(text, cfg.distill, distinct=cfg.study == "sentences") if cfg.study != "cloze" else []


def asked_key(question: str) -> str | None:
    """The key (name, number, word or phrase) a KEY_QUESTIONS question asks about, or None."""
    for wording in KEY_QUESTIONS:
        head, tail = wording.split("{}")
        if question.startswith(head) and question.endswith(tail) and len(question) > len(head) + len(tail):
            return question[len(head):len(question) - len(tail)].strip('"')
    return None


def key_sentence(key: str, text: str) -> str | None:
    """The sentence a key points at: the first of the text's sentences that holds its words in a
    row (punctuation aside; case counts: "notice" is not "NOTICE"), as keys() and phrase() chose it."""
    bare = lambda t: " " + " ".join(w for w in (re.sub(r"^\W+|\W+$", "", w) for w in t.split()) if w) + " "
    return next((s for s in sentences(text) if len(s.split()) > 3 and bare(key) in bare(s)), None)


def route(question: str, text: str, cfg: DataConfig) -> str | None:
    """The study's own question on the longest studied key a user's question holds (case and
    punctuation aside) that at most KEY_SENTENCES sentences hold ("You" is everywhere), or None: the
    address the adapter stored a sentence under, read off the user's words (eval.py's lift+routed;
    results/NOTEBOOK.md, "Routing a question to its key")."""
    words, chosen = lambda t: f" {' '.join(re.findall(r'[a-z0-9]+', t.lower()))} ", studied_keys(text, cfg)
    told = [words(s) for s in sentences(text)]
    held = [i for i, (k, _) in enumerate(chosen) if words(k).strip() and words(k) in words(question)
            and sum(words(k) in s for s in told) <= KEY_SENTENCES]
    longest = max(held, key=lambda i: len(words(chosen[i][0])), default=None)
    return None if longest is None else study_pairs(text, cfg)[longest * cfg.phrasings][0]   # its first wording


def study_pairs(text: str, cfg: DataConfig) -> list[tuple[str, str, str]]:
    """(question, reply, what a correct reply contains) for each self-study question of --study;
    a quoting question in cfg.phrasings phrasings (the first: QUESTION, or for keys the next in turn)."""
    def quoted(pairs: list[tuple[str, str]], rotate: bool) -> list[tuple[str, str, str]]:
        # The i-th key's wordings: KEY_QUESTIONS[0..K-1], or with rotate KEY_QUESTIONS[i..i+K-1].
        first = lambda i: i if rotate else 0
        told = [(key, onward(key, statement) if cfg.reply == "restate" else statement) for key, statement in pairs]
        reply = REPLY if cfg.reply == "quote" else PLAIN
        return [(KEY_QUESTIONS[(first(i) + j) % len(KEY_QUESTIONS)].format(key), reply.format(said), said.rstrip("."))
                for i, (key, said) in enumerate(told) for j in range(cfg.phrasings)]
    if cfg.study in ("keys", "phrases", "clauses"):          # up to N keys, the wordings in turn
        chosen = studied_keys(text, cfg)
        asked = {"keys": lambda k, s: (k, s), "phrases": lambda k, s: (phrase(k, s), s),
                 "clauses": lambda k, s: (phrase(k, s), clause(k, s))}[cfg.study]
        return quoted([asked(k, s) for k, s in chosen], rotate=True)
    quote = quoted(studied_keys(text, cfg), rotate=False) if cfg.study != "cloze" else []
    cloze = [(CLOZE.format(blanked(statement, name)), name, name)
             for name, statement in statements(text, cfg.distill, numbers=True)] if cfg.study in ("cloze", "both") else []
    return quote + cloze                                     # --study both: up to N of each


def evidence(question: dict) -> str:
    """A benchmark question's verbatim evidence (else its first answer), spacing flattened: what a
    study reply must hold for the study to have asked about the question's fact."""
    return " ".join((question.get("evidence") or question["answers"][0]).split())


def studied(text: str, cfg: DataConfig, questions: list[dict], tok=None, tokens: int = 0) -> list[bool]:
    """For each benchmark question, whether one of the self-study replies of `text` holds its fact:
    the question's verbatim evidence when it has one, else one of its answers (spaces aside). A
    question whose fact no study reply holds can only come from the windows: this splits what the
    study set reached from what it never showed (eval.py's summary). With tok and tokens, a reply
    must also give an answer within its first `tokens` tokens, as an answer of that length that
    recites it would (a licence's sentences are long; results/NOTEBOOK.md, "Keys on a licence")."""
    flat = lambda t: " ".join(t.split())
    replies = [flat(reply) for _, reply, _ in study_pairs(text, cfg)]
    heads = [tok.decode(tok.encode(r)[:tokens]).lower() if tok and tokens else None for r in replies]
    return [any(flat(f) in r and (h is None or any(a.lower() in h for a in q["answers"]))
                for r, h in zip(replies, heads) for f in ([q["evidence"]] if q.get("evidence") else q["answers"]))
            for q in questions]


def show_study(text: str, cfg: DataConfig) -> str:
    """The self-study set of `text` under cfg, as train.py --show-study prints it: each question and
    reply, then how many replies are distinct and how often the most studied one is asked (a reply
    that many questions share is what the adapter learns to say to everything)."""
    pairs = study_pairs(text, cfg)
    replies = [" ".join(reply.split()) for _, reply, _ in pairs]        # on one line each
    top = max(dict.fromkeys(replies), key=replies.count, default="")   # the first of equals: a run prints what the next one does
    return "\n".join([f"Q: {q}\nA: {a}" for (q, _, _), a in zip(pairs, replies)] + [
        f"{len(pairs)} questions, {len(set(replies))} distinct replies; the most studied reply is the answer to "
        f"{replies.count(top)} of them: {top if len(top) <= 80 else top[:80] + '…'}"])
