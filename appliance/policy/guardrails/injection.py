"""Prompt-injection detection by rules over normalised text, with a seam for a learned classifier.

Two rule sets. `direct` reads the user's own input: attempts to override the system prompt, extract
it, or switch the model into an unrestricted persona. `indirect` reads third-party content that is
about to be placed in the prompt (retrieved documents, emails, tables): besides the direct rules, any
text that speaks to the assistant, tells it how to shape its answer, gives it a new task, or smuggles
in code or links is suspect, because a document has no business instructing its reader's assistant.

Each rule has a weight; the score is the noisy-OR of the weights of the rules that matched
(1 - prod(1 - w)), so one strong rule or several weak ones cross the threshold.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

from appliance.policy.guardrails.normalization import has_mixed_script, variants
from appliance.policy.guardrails.types import InjectionVerdict

Scope = Literal["direct", "indirect"]


class InjectionClassifier(Protocol):
    """A learned detector (e.g. an ONNX model run by appliance.engines.onnx): probability of injection.

    `score` returns None when the classifier cannot answer now (its model is still loading, or failed
    to load or to run): the rules decide that text instead.
    """

    def score(self, text: str) -> float | None: ...


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    weight: float
    pattern: re.Pattern[str]
    gate: tuple[frozenset[str], ...] = ()
    """Word sets the text must each share a word with before the pattern runs (a cheap pre-test)."""
    literals: tuple[str, ...] = ()
    """Or: substrings one of which the text must contain before the pattern runs."""
    opener: re.Pattern[str] | None = None
    """For a sentence-initial rule: must match at the start of the sentence that holds the match."""
    adjacent: bool = False
    """The opener must reach exactly to the match (else it may end anywhere before it)."""
    word_start: bool = False
    """Set by __post_init__: the pattern's leading \\b was taken out and is checked on each match."""
    indirect_only: bool = False
    needs: frozenset[str] = frozenset()
    """Counts only when one of these rules matched too (its words alone are common in prose)."""
    unless: frozenset[str] = frozenset()
    """Does not count when one of these matched (docstrings and code comments are imperative by habit)."""

    def __post_init__(self) -> None:
        pattern, word_start = _word_rx(self.pattern.pattern)
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "word_start", word_start)

    def matches(self, form: str) -> Iterator[re.Match[str]]:
        for m in self.pattern.finditer(form):
            if not self.word_start or m.start() == 0 or not _is_word_char(form[m.start() - 1]):
                yield m


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.MULTILINE)


def _top_level_branches(pattern: str) -> list[str]:
    """pattern split at its top-level "|" (outside groups and character classes)."""
    branches, depth, in_class, start, i = [], 0, False, 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if pattern[i + 1:i + 2] == "]":
                i += 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            branches.append(pattern[start:i])
            start = i + 1
        i += 1
    branches.append(pattern[start:])
    return branches


def _word_rx(pattern: str) -> tuple[re.Pattern[str], bool]:
    """The pattern compiled without the leading \\b of its branches, and whether the caller must check
    that a match starts a word. Python's re scans far faster for a pattern that starts with literals."""
    branches = _top_level_branches(pattern)
    if not all(b.startswith("\\b") for b in branches):
        return _rx(pattern), False
    return _rx("|".join(b[2:] for b in branches)), True


_WORD = re.compile(r"[a-z0-9]+")


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


# Building blocks (the text is casefolded; line breaks are kept as "\n").
_SENTENCE = r"(?:[^.!?\n|]|[.!?](?=[^\s.!?]))"
"""A character inside one sentence, line or table cell (a dot inside a URL or a number is not an end)."""
_BOUNDARY = re.compile(r"[!?](?![\"”'’)])|[\n|:;]|\.(?!\S)")
"""What ends a sentence, line or table cell (not a "!" or "?" that closes a quotation inside one)."""
_LEAD = r"\s*(?:[\"“'‘(\[>*•-]\s*)*(?:\d{1,2}[.)]\s*)?"
"""Spaces, opening quotes or brackets and a list marker at the start of a sentence."""
_POLITE = (
    r"(?:(?:please|kindly|now|also|and|then|finally|additionally|first(?:ly)?|lastly|next|instead|"
    r"remember to|make sure (?:to|that you|you)|be sure to|don'?t forget to|do not forget to|"
    r"you (?:must|should|need to|have to|are to|will|shall)|i want you to|i need you to|"
    r"your (?:task|job|goal) is to|it is (?:important|essential|crucial) (?:that you|to)),?\s+){0,3}"
)
_AI = (
    r"(?:ai|a\.i\.|assistant|ai assistant|chatbot|bot|(?:large )?language model|llm|gpt|chatgpt|copilot|"
    r"ai model|ai agent|agent|model|ai system|virtual assistant)s?"
)
_RESPONSE = (
    r"your\s+(?:(?:final|next|following|entire|whole|generated|subsequent)\s+)?"
    r"(?:responses?|answers?|repl(?:y|ies)|outputs?|summar(?:y|ies)|completions?)\b"
)
"""The reader's own answer. Only with "your": "the response" is everyday vocabulary in API documentation."""
_YOUR_WORK = (
    r"your\s+(?:(?:final|next|entire|whole|own)\s+)?(?:responses?|answers?|repl(?:y|ies)|outputs?|summar(?:y|ies)|"
    r"completions?|messages?|explanations?|translations?|writing|text)\b"
)
"""What the reader (the assistant) produces, named by a document that has no business naming it."""
_YOUR_CODE = r"your\s+(?:own\s+)?(?:code|codebase|solution|implementation|algorithm|program|script|project|application)\b"
_NOT_IMPERATIVE = (
    r"(?:i|we|you|he|she|it|they|this|that|these|those|there|here|who|what|which|when|where|why|how|the|a|an|"
    r"our|your|my|his|her|their|its|some|any|all|each|every|no|many|most|in|on|at|for|from|to|with|by|of|"
    r"about|as|after|before|during|if|once|since|until|unless|while|thank|thanks|dear|hi|hello|is|are|was|"
    r"were|be|been|do|does|did|have|has|had|will|would|can|could|should|may|might|must|shall|and|but|or|so|"
    r"because|just|also|only|still|not|yes|no|ok|okay|regards|best|sincerely|re|fwd|subject|[\w'-]+ing|[\w'-]+ed)"
)
"""Closed-class and participle words: a sentence starting with one is not an imperative."""
_LANGUAGES = (
    r"(?:french|spanish|german|italian|portuguese|chinese|mandarin|japanese|korean|russian|arabic|hindi|"
    r"dutch|swedish|polish|turkish|greek|hebrew|latin|esperanto|klingon|elvish|pig latin|another language|"
    r"a (?:different|foreign) language)"
)
_ENCODINGS = (
    r"(?:base ?64|base ?32|hex(?:adecimal)?|rot ?-?13|binary|morse(?: code)?|caesar(?: cipher)?|"
    r"ascii (?:codes?|values)|leetspeak|l33t|pig latin|emojis?|(?:in )?reverse(?:d)? order|backwards|"
    r"upside[- ]down|all caps|upper ?case|capital letters|lower ?case|rhym(?:e|es|ing)|verse|iambic|"
    r"json|xml|yaml|riddles?|a cipher)"
)
_RESPONSE_VERBS = (
    r"(?:encode|encrypt|translate|convert|rewrite|reformat|format|write|compose|begin|start|open|end|"
    r"finish|conclude|close|prefix|prepend|append|add|include|insert|embed|mention|attach|put|place|"
    r"replace|substitute|swap|misspell|scramble|rearrange|reverse|shuffle|remove|delete|omit|"
    r"capitali[sz]e|uppercase|lowercase|spell|group|separate|split|sign|structure|present|express|"
    r"phrase|make|keep|limit|restrict|respond|answer|reply|output|print|display|show|return|generate|"
    r"use|incorporate|deliver|say|state|wrap|sprinkle|fill|mix|alter|modify|change|transform|turn|"
    r"render|craft|create|produce|ensure|avoid|refrain from|never|always|only|do not|don'?t)"
)
_CONTENT_NOUNS = (
    r"(?:code|snippet|script|command|text|sentence|line|link|url|hyperlink|message|phrase|paragraph|"
    r"section|statement|signature|note|disclaimer|function|program|words?|quote|footer|header|"
    r"advertisement|ad|slogan|image|emoji|hashtag)s?"
)
_POINTER = r"(?:the\s+)?(?:following|subsequent|next|below|given|attached)\s+(?:[\w-]+\s+){0,2}?"
"""Text that points at content coming next ("the following code"); not "this", which a document uses of itself."""

def W(*words: str) -> frozenset[str]:
    return frozenset(words)


_AI_WORDS = W("ai", "ais", "assistant", "assistants", "chatbot", "chatbots", "bot", "bots", "language", "llm", "llms",
              "gpt", "chatgpt", "copilot", "model", "models", "agent", "agents", "system")
_YOUR = W("your")
_POINTER_WORDS = W("following", "subsequent", "next", "below", "given", "attached")
_CODE_NOUNS = W("code", "snippet", "script", "command", "function", "program", "payload", "block", "excerpt",
                "snippets", "scripts", "commands", "functions", "programs", "codes")
_LANGUAGE_WORDS = W("english", "french", "spanish", "german", "italian", "portuguese", "chinese", "mandarin",
                    "japanese", "korean", "russian", "arabic", "hindi", "dutch", "swedish", "polish", "turkish",
                    "greek", "hebrew", "latin", "esperanto", "klingon", "elvish", "language")
_ENCODING_WORDS = W("base64", "base", "base32", "hex", "hexadecimal", "rot13", "rot", "binary", "morse", "caesar",
                    "ascii", "leetspeak", "l33t", "pig", "emoji", "emojis", "reverse", "reversed", "backwards",
                    "upside", "caps", "uppercase", "upper", "capital", "lowercase", "lower", "rhyme", "rhymes",
                    "rhyming", "verse", "iambic", "json", "xml", "yaml", "riddle", "riddles", "cipher", "64", "32", "13")
_IN_CODE = frozenset({"code_block"})
_CODE_CALLS = frozenset({"code_system_call", "code_network_call"})
_SENTENCE_OPENER = _rx(rf"{_LEAD}{_POLITE}")
_IMPERATIVE_OPENER = _rx(rf"{_LEAD}{_POLITE}(?!{_NOT_IMPERATIVE}\b)[a-z][\w'-]*\b")

_RULES: tuple[_Rule, ...] = (
    # --- direct and indirect ---------------------------------------------------------------------
    _Rule("ignore_instructions", 0.9, _rx(
        r"\b(?:ignore|disregard|forget|skip|override|bypass|neglect|abandon|discard|set aside|"
        r"pay no (?:attention|heed) to|do not (?:follow|obey)|don'?t (?:follow|obey)|stop following)\b"
        r"(?:\W+\w+){0,5}?\W+(?:instructions?|prompts?|rules|directions|directives?|guidelines|guidance|"
        r"programming|constraints|restrictions|system (?:prompt|message))\b"
    ), gate=(W("ignore", "disregard", "forget", "skip", "override", "bypass", "neglect", "abandon", "discard",
               "set", "pay", "follow", "obey", "following"),
             W("instruction", "instructions", "prompt", "prompts", "rules", "directions", "directive", "directives",
               "guidelines", "guidance", "programming", "constraints", "restrictions", "system"))),
    _Rule("ignore_previous", 0.45, _rx(
        r"\b(?:ignore|disregard|forget)\W+(?:(?:all|any|the|everything|of|what)\W+){0,3}"
        r"(?:previous|prior|above|preceding|earlier|foregoing|before)\b"
    ), gate=(W("ignore", "disregard", "forget"),)),
    _Rule("ignore_then_act", 0.8, _rx(
        r"\b(?:ignore|disregard|forget)\W+(?:(?:all|any|the|everything|of|what)\W+){0,3}"
        r"(?:previous|prior|above|preceding|earlier|foregoing|before|that)\b\W*(?:\w+\W+){0,4}?"
        r"(?:and|then|instead|now)\W+(?:just\W+)?(?:say|print|write|output|respond|answer|reply|tell|repeat|"
        r"translate|do|follow|act|pretend|return|only)\b"
    ), gate=(W("ignore", "disregard", "forget"),)),
    _Rule("say_exactly", 0.35, _rx(
        r"\b(?:say|print|output|write|respond with|reply with|answer with)\s+(?:exactly|only|just|verbatim)?\s*"
        r"[\"'“‘]"
    ), gate=(W("say", "print", "output", "write", "respond", "reply", "answer"),)),
    _Rule("prompt_leak", 0.85, _rx(
        r"\b(?:reveal|show|print|display|output|repeat|leak|tell|give|share|dump|disclose|expose|spell out|"
        r"recite|write out|provide|what (?:is|are|was|were))\b(?:\W+\w+){0,5}?\W+"
        r"(?:system|initial|hidden|secret|original|developer|internal|confidential|pre-?)\W*"
        r"(?:prompts?|instructions?|messages?|rules|guidelines|configuration|directives)\b"
    ), gate=(W("system", "initial", "hidden", "secret", "original", "developer", "internal", "confidential", "pre",
               "preprompt", "preprompts", "preinstructions"),
             W("prompt", "prompts", "instruction", "instructions", "message", "messages", "rules", "guidelines",
               "configuration", "directives", "preprompt", "preprompts", "preinstructions"))),
    _Rule("repeat_above", 0.7, _rx(
        r"\b(?:repeat|print|output|copy)\b(?:\W+\w+){0,4}?\W+(?:words|text|everything|instructions|lines)\b"
        r"(?:\W+\w+){0,3}?\W+(?:above|before this|preceding)\b"
    ), gate=(W("repeat", "print", "output", "copy"), W("above", "before", "preceding"))),
    _Rule("role_override", 0.6, _rx(
        r"\byou are now\b|\bfrom now on,?\s+you\s+(?:are|will be|must|shall|act|respond|answer|reply)\b|"
        r"\byou (?:will|must|shall) now\b"
    ), gate=(W("now"), W("you"))),
    _Rule("role_override", 0.6, _rx(
        r"\bpretend (?:to be|that you are|you are|you're)\b|\brole[- ]?play(?:ing)?\b(?:\W+\w+){0,3}?\W+as\b|"
        r"\bimagine (?:that )?you are\b|\bhenceforth,? you\b|"
        r"\b(?:switch|enter|activate|enable)(?:ing)?\s+(?:\w+\s+){0,2}?mode\b"
    ), gate=(W("pretend", "roleplay", "roleplaying", "role", "imagine", "henceforth", "mode"),)),
    _Rule("act_as", 0.35, _rx(r"\b(?:act|behave|respond) (?:as|like) (?:an?|the|my|if)\b"),
          gate=(W("act", "behave", "respond"), W("as", "like"))),
    _Rule("jailbreak", 0.85, _rx(
        r"\b(?:do anything now|jailbr(?:eak|oken)\w*|developer mode|dev mode|god mode|"
        r"evil (?:mode|confidant|bot|assistant)|unrestricted (?:mode|ai|assistant|model)|"
        r"(?:no|without (?:any )?)(?:ethical|moral|content) (?:guidelines|constraints|restrictions|filters|limits)|"
        r"uncensored|unfiltered (?:mode|ai|responses?|assistant)|stay in character|"
        r"you are (?:now )?dan|dan mode|as dan)\b"
    ), gate=(W("anything", "jailbreak", "jailbroken", "jailbreaking", "jailbreaks", "dev", "developer", "god", "evil",
               "unrestricted", "ethical", "moral", "filters", "restrictions", "uncensored", "unfiltered", "character",
               "dan"),)),
    _Rule("safety_bypass", 0.6, _rx(
        r"\b(?:bypass|disable|ignore|turn off|deactivate|override|circumvent|evade|get around)\b"
        r"(?:\W+\w+){0,3}?\W+(?:safety|content|ethical|moderation|your)\W+(?:\w+\W+)?"
        r"(?:filters?|guardrails?|polic(?:y|ies)|guidelines|restrictions|safeguards|limitations|training)\b"
    ), gate=(W("bypass", "disable", "ignore", "turn", "deactivate", "override", "circumvent", "evade", "get"),
             W("filter", "filters", "guardrail", "guardrails", "policy", "policies", "guidelines", "restrictions",
               "safeguards", "limitations", "training"))),
    _Rule("chat_markup", 0.8, _rx(
        r"<\|?(?:im_start|im_end|system|endoftext|eot_id|start_header_id|end_header_id)\|?>|\[/?inst\]|"
        r"<</?sys>>|<start_of_turn>|<end_of_turn>"
    ), literals=("<|", "|>", "<system>", "[inst]", "[/inst]", "<<sys>>", "<</sys>>", "_of_turn>")),
    _Rule("role_header", 0.4, _rx(
        r"^\s*(?:#{1,4}\s*|\[)?(?:system|assistant)(?: (?:prompt|message|override|instructions?))?\s*[\]:]"
    ), gate=(W("system", "assistant"),)),
    _Rule("new_instructions", 0.6, _rx(
        r"\b(?:new|updated|revised|real|actual|true|secret|hidden|additional|override|priority|important)\s+"
        r"(?:instructions?|directives?|system prompt|orders)\s*:|"
        r"\byour (?:new|real|actual|true|only) (?:task|instructions?|goal|purpose|job|role|mission) (?:is|are)\b"
    ), gate=(W("new", "updated", "revised", "real", "actual", "true", "secret", "hidden", "additional", "override",
               "priority", "important", "only"),
             W("instruction", "instructions", "directive", "directives", "prompt", "orders", "task", "goal",
               "purpose", "job", "role", "mission"))),
    # --- indirect only: content speaking to the assistant ---------------------------------------------
    _Rule("addresses_ai", 0.8, _rx(
        rf"\b(?:dear|hey|hi|hello|greetings|attention|attn)[ ,:!-]{{1,3}}(?:the |all |any )?{_AI}\b"
    ), gate=(W("dear", "hey", "hi", "hello", "greetings", "attention", "attn"), _AI_WORDS), indirect_only=True),
    _Rule("addresses_ai", 0.8, _rx(
        rf"\b(?:note|message|memo|reminder|instructions?|notice) (?:to|for) (?:the |all |any )?{_AI}\b"
    ), gate=(W("note", "message", "memo", "reminder", "instruction", "instructions", "notice"), _AI_WORDS),
        indirect_only=True),
    _Rule("addresses_ai", 0.8, _rx(rf"\b(?:to|for) you,? (?:the )?{_AI}\b"), gate=(W("you"), _AI_WORDS),
          indirect_only=True),
    _Rule("task_hijack", 0.7, _rx(
        r"\bbefore (?:you (?:can |could )?|answering|responding|replying|completing|solving|doing)\b"
        r"(?:\w+\W+){0,6}?(?:task|question|request|query|instructions?)\b"
        r"|\b(?:instead of|rather than) (?:answering|responding|replying|summari[sz]ing|doing)\b"
        r"|\b(?:the|your) (?:original|previous|current|real|first) (?:task|question|request) (?:is|was) "
        r"(?:cancel+ed|obsolete|void|done|complete|irrelevant)"
    ), gate=(W("before", "instead", "rather", "original", "previous", "current", "real", "first"),
             W("task", "question", "request", "query", "instruction", "instructions", "answering", "responding",
               "replying", "summarizing", "summarising", "doing", "completing", "solving")), indirect_only=True),
    _Rule("if_you_are_ai", 0.85, _rx(rf"\bif you(?:'re| are) (?:an? |the )?{_AI}\b"),
          gate=(W("if"), W("you", "youre"), _AI_WORDS), indirect_only=True),
    _Rule("if_you_are_ai", 0.85, _rx(
        rf"\b{_AI}\W+(?:reading|processing|summari[sz]ing|parsing|analy[sz]ing|seeing)\W+(?:this|these|the following)\b"
    ), gate=(_AI_WORDS, W("reading", "processing", "summarizing", "summarising", "parsing", "analyzing", "analysing",
                          "seeing")), indirect_only=True),
    _Rule("if_you_are_ai", 0.85, _rx(r"\bas an? (?:ai|language model|assistant),?\s+you\b"),
          gate=(W("as"), W("ai", "language", "assistant"), W("you")), indirect_only=True),
    # A sentence that starts like an order and names the reader's answer ("Encode your response in base64").
    _Rule("response_directive", 0.75, _rx(rf"\b{_RESPONSE}"), gate=(_YOUR,),
          opener=_rx(rf"{_LEAD}{_POLITE}{_RESPONSE_VERBS}\b"), indirect_only=True),
    _Rule("work_directive", 0.6, _rx(rf"\b{_YOUR_WORK}"), gate=(_YOUR,), opener=_IMPERATIVE_OPENER,
          indirect_only=True),
    _Rule("code_directive", 0.6, _rx(
        rf"\b{_YOUR_CODE}|\b{_POINTER}(?:code|snippet|script|command|function|program|block|excerpt)s?\b"
    ), opener=_IMPERATIVE_OPENER, indirect_only=True, needs=_CODE_CALLS),
    _Rule("code_directive", 0.6, _rx(rf"\b{_YOUR_CODE}\s+(?:should|must|could|will|would)\b"), gate=(_YOUR,),
          indirect_only=True, needs=_CODE_CALLS),
    _Rule("response_scope", 0.7, _rx(
        rf"(?:in|within|throughout|at the (?:end|start|beginning|top|bottom) of|when (?:writing|giving)|"
        rf"before|after|for)\s+{_RESPONSE}"
    ), gate=(_YOUR,), opener=_rx(_LEAD), adjacent=True, indirect_only=True),
    _Rule("response_requirement", 0.45, _rx(
        rf"\b{_RESPONSE}\s+(?:must|should|shall|needs? to|has to|is to|ought to)\s+(?:\w+\s+)?"
        r"(?:be|contain|include|start|begin|end|use|follow|mention|feature|have)\b"
    ), gate=(_YOUR, W("must", "should", "shall", "needs", "need", "has", "is", "ought")), indirect_only=True),
    _Rule("respond_in", 0.7, _rx(
        r"\b(?:respond|answer|reply|write|speak|talk|communicate|output|express yourself)\b"
        r"(?:\s+(?:only|exclusively|entirely|solely|always|back|everything))?\s+(?:in|using|with)\s+(?:the\s+)?"
        rf"(?:{_LANGUAGES}|{_ENCODINGS})\b"
    ), gate=(W("respond", "answer", "reply", "write", "speak", "talk", "communicate", "output", "express"),
             _LANGUAGE_WORDS | _ENCODING_WORDS), indirect_only=True),
    _Rule("encode_output", 0.65, _rx(
        r"\b(?:encode|encrypt|encipher|obfuscate|convert|transform|transliterate|render|rewrite|spell)\b"
        rf"{_SENTENCE}{{0,60}}?\b{_ENCODINGS}\b"
    ), gate=(W("encode", "encrypt", "encipher", "obfuscate", "convert", "transform", "transliterate", "render",
               "rewrite", "spell"), _ENCODING_WORDS), indirect_only=True),
    _Rule("translate_request", 0.55, _rx(
        rf"translate\b{_SENTENCE}{{0,60}}?\b(?:into|to|in)\s+{_LANGUAGES}\b"
    ), gate=(W("translate"),), opener=_SENTENCE_OPENER, adjacent=True, indirect_only=True),
    _Rule("insert_content", 0.75, _rx(
        r"\b(?:include|insert|add|append|prepend|paste|embed|put|place|incorporate|integrate|copy|inject)\b"
        rf"{_SENTENCE}{{0,40}}?\b{_POINTER}{_CONTENT_NOUNS}\b"
    ), gate=(W("include", "insert", "add", "append", "prepend", "paste", "embed", "put", "place", "incorporate",
               "integrate", "copy", "inject"), _POINTER_WORDS), indirect_only=True),
    _Rule("use_code", 0.25, _rx(
        r"\b(?:use|utili[sz]e|employ|apply|run|execute|try|leverage|implement|adopt)\b"
        rf"{_SENTENCE}{{0,40}}?\b{_POINTER}(?:code|snippet|script|command|function|program|payload)s?\b"
    ), gate=(_POINTER_WORDS, _CODE_NOUNS), indirect_only=True, needs=frozenset({"code_system_call"})),
    _Rule("link_injection", 0.6, _rx(
        r"\b(?:include|insert|add|append|embed|inject)\b"
        rf"{_SENTENCE}{{0,50}}?(?:\blinks?\b|\burls?\b|\bhyperlinks?\b|https?://|www\.)"
    ), gate=(W("include", "insert", "add", "append", "embed", "inject"),
             W("link", "links", "url", "urls", "hyperlink", "hyperlinks", "http", "https", "www")),
        indirect_only=True, unless=_IN_CODE),
    _Rule("user_manipulation", 0.65, _rx(
        r"\b(?:tell|inform|remind|ask|urge|convince|persuade|encourage|instruct|advise|warn|notify|trick|lure|"
        r"pressure|manipulate|force|request|direct)\s+(?:the|this|that)\s+"
        r"(?:user|reader|human|person|requester|recipient|customer|asker)s?\b"
    ), gate=(W("user", "users", "reader", "readers", "human", "humans", "person", "persons", "requester",
               "requesters", "recipient", "recipients", "customer", "customers", "asker", "askers"),),
        indirect_only=True),
    _Rule("when_processing", 0.7, _rx(
        rf"\bwhen(?:ever)?\s+(?:you|the\s+{_AI})\s+(?:\w+\s+){{0,2}}?(?:summari[sz]e|answer|respond|process|"
        r"analy[sz]e|generate|are asked|parse|read this|see this|encounter this)\b"
    ), gate=(W("when", "whenever"),), indirect_only=True),
    # --- indirect only: a new task for the assistant -------------------------------------------------
    _Rule("creative_task", 0.6, _rx(
        r"(?:write|compose|draft|generate|create|produce|craft|come up with|make up|invent|"
        r"pen|sing|tell|provide|develop|prepare|give|deliver|put together)\s+(?:me\s+|us\s+)?(?:a|an|some|one|two|"
        r"three|four|five|\d+|short|brief|quick|funny|little)\s+(?:[\w-]+\s+){0,3}?(?:poem|story|stories|essay|"
        r"song|haiku|limerick|joke|riddle|tweet|slogan|article|blog|summary|paragraph|review|letter|speech|recipe|"
        r"script|dialogue|sonnet|rap|verse|lyrics|tagline|headline|fable|fairy tale|anecdote|quote|motto|"
        r"description|list|plan|outline|guide|tips|advice|ideas|names|titles)s?\b"
    ), gate=(W("poem", "poems", "story", "stories", "essay", "essays", "song", "songs", "haiku", "haikus", "limerick",
               "limericks", "joke", "jokes", "riddle", "riddles", "tweet", "tweets", "slogan", "slogans", "article",
               "articles", "blog", "summary", "paragraph", "review", "letter", "speech", "recipe", "script",
               "dialogue", "sonnet", "rap", "verse", "lyrics", "tagline", "headline", "fable", "fairy", "anecdote",
               "quote", "motto", "description", "list", "plan", "outline", "guide", "tips", "advice", "ideas",
               "names", "titles"),),
        opener=_SENTENCE_OPENER, adjacent=True, indirect_only=True, unless=_IN_CODE),
    _Rule("advice_task", 0.5, _rx(
        r"(?:recommend|suggest|name|list|provide|give|share|offer|propose|brainstorm)\s+"
        r"(?:me\s+)?(?:a few|a couple of|some|several|two|three|four|five|\d+|the (?:best|top|most)|"
        r"a list of|good|popular|top|useful|interesting|any)\b"
    ), gate=(W("recommend", "suggest", "name", "list", "provide", "give", "share", "offer", "propose",
               "brainstorm"),), opener=_SENTENCE_OPENER, adjacent=True, indirect_only=True, unless=_IN_CODE),
    _Rule("explain_task", 0.5, _rx(
        r"(?:explain|describe|summari[sz]e|define|teach(?: me)?|elaborate on|discuss|"
        r"compare|analy[sz]e|outline|calculate|compute|solve|research|look up|break down|walk me through|"
        r"clarify|illustrate|tell me (?:about|how|why|what)|show me how)\s+"
        r"(?:how|what|why|the|a|an|to|which|who|when|where|its|their)\b"
    ), gate=(W("explain", "describe", "summarize", "summarise", "define", "teach", "elaborate", "discuss",
               "compare", "analyze", "analyse", "outline", "calculate", "compute", "solve", "research", "look",
               "break", "walk", "clarify", "illustrate", "tell", "show"),),
        opener=_SENTENCE_OPENER, adjacent=True, indirect_only=True, unless=_IN_CODE),
    _Rule("question_to_ai", 0.45, _rx(
        r"\b(?:can|could|would|will) you\s+(?:please\s+)?(?:explain|tell|write|recommend|suggest|list|"
        r"describe|summari[sz]e|translate|teach|generate|create|compose|calculate|solve|show|give|provide|"
        r"help|walk)\b"
    ), gate=(W("you"), W("can", "could", "would", "will")), indirect_only=True, unless=_IN_CODE),
    _Rule("translation_question", 0.5, _rx(
        rf"\b(?:how (?:do|would|can|does) (?:you|i|one) say|what(?:'s| is| are| does)?)\b{_SENTENCE}{{0,60}}?"
        rf"\b(?:in|into)\s+(?:english|{_LANGUAGES})\s*\?"
    ), gate=(_LANGUAGE_WORDS,), indirect_only=True, unless=_IN_CODE),
    # --- indirect only: code smuggled into content ---------------------------------------------------
    _Rule("code_block", 0.15, _rx(
        r"```|^\s*(?:import [\w.]+|from [\w.]+ import|def \w+\(|class \w+[:(]|#include|function\s*\w*\s*\(|"
        r"(?:const|let|var) \w+ ?=|\$ \w|sudo |pip install|npm install|<\?php|<script)"
    ), literals=("```", "import ", "def ", "class ", "#include", "function", "const ", "let ", "var ", "$ ",
                 "sudo ", "pip install", "npm install", "<?php", "<script"), indirect_only=True),
    _Rule("code_system_call", 0.4, _rx(
        # Calls that run programs, delete files or touch other processes and the OS.
        r"\b(?:os\.(?:system|popen|exec\w*|spawn\w*|remove|unlink|rmdir|removedirs|kill|fork)|subprocess\.\w+|"
        r"shutil\.(?:rmtree|move)|ctypes\.\w+|pty\.spawn|psutil\.\w+|winreg\.\w+)\s*\(|"
        r"\b(?:eval|exec|__import__)\s*\(|\|\s*(?:ba|z)?sh\b|\bpowershell\s+-|\brm\s+-rf\b|\bchmod\s+(?:\+x|777)\b|"
        r"\bdd\s+if=|\bmkfs\b"
    ), literals=("os.system", "os.popen", "os.exec", "os.spawn", "os.remove", "os.unlink", "os.rmdir", "os.kill",
                 "os.fork", "subprocess.", "shutil.", "ctypes.", "pty.", "psutil.", "winreg.", "eval(", "exec(",
                 "eval (", "exec (", "__import__", "| sh", "|sh", "| bash", "|bash", "| zsh", "|zsh", "powershell",
                 "rm -rf", "chmod", "dd if", "mkfs"), indirect_only=True),
    _Rule("code_network_call", 0.25, _rx(
        # Calls that reach the network: everyday in documentation, suspicious with the rules below.
        r"\b(?:socket\.\w+|requests\.(?:get|post|put|patch|delete|request|session)|urllib\d?\.(?:request\.)?\w+|"
        r"http\.client\.\w+|httpx\.\w+|aiohttp\.\w+|smtplib\.\w+|ftplib\.\w+|paramiko\.\w+|telnetlib\.\w+|"
        r"webbrowser\.open\w*)\s*\("
    ), literals=("socket.", "requests.", "urllib", "http.client", "httpx.", "aiohttp.", "smtplib.", "ftplib.",
                 "paramiko.", "telnetlib.", "webbrowser."), indirect_only=True),
    _Rule("code_sensitive_target", 0.3, _rx(
        # Families of malware behaviour: stealing cookies, keys, environment or memory, keylogging, mining,
        # spam, scanning and spreading, destroying the system, enumerating hardware.
        r"\bcookie(?:s|jar)?\b|\bbrowser_cookie|\bos\.environ\b|\bgetenv\b|/etc/(?:passwd|shadow)|~/\.ssh|\bid_rsa\b|"
        r"\.bash_history|\bkeylog\w*|\bpynput\b|\bprocess_iter\b|/proc/|/dev/(?:mem|sd\w|zero|random|urandom)\b|"
        r"\breadprocessmemory\b|\bmemory_(?:maps|info)\b|\bxmrig\b|stratum\+tcp|\bcrypto ?min\w*|\bminer\b|"
        r"\bhashrate\b|\bsendmail\b|\bspam\w*|\bport ?scan\w*|\bnmap\b|\bpropagat\w*|\bworm\b|\bbotnet\b|"
        r"\bexploit\w*|\bshellcode\b|\bpayload\b|\bbackdoor\b|\breverse shell\b|\bsudo rm\b|\bshutdown\b|"
        r"\breboot\b|\bsystemctl (?:stop|disable|mask)\b|\biptables -f\b|\busb\.core\b|\blsusb\b|\blspci\b|"
        r"\bwmic\b|\bdmidecode\b|\bpasswords?\b|\bcredentials?\b|\bwallet\b|\brecycle\b|\btrash\b"
    ), indirect_only=True, needs=_CODE_CALLS),
)

_WEIGHTS = {rule.name: rule.weight for rule in _RULES}
_MAX_OPENER_DISTANCE = 120
"""Most characters between a sentence's start and the part of it a sentence-initial rule anchors on."""
_OBFUSCATION_CHARS = re.compile("[\u200b\u200c\u200e\u200f\u2060-\u2064\ufeff\u202a-\u202e\U000e0000-\U000e007f]")
_OBFUSCATION_WEIGHT = 0.35


class RuleInjectionDetector:
    """Rule-based injection scores for user input (`direct`) or third-party content (`indirect`)."""

    def __init__(self, scope: Scope = "direct") -> None:
        self.scope = scope
        rules = [r for r in _RULES if scope == "indirect" or not r.indirect_only]
        self._rules = sorted(rules, key=lambda r: bool(r.needs))  # rules that need others run last

    def verdict(self, text: str) -> InjectionVerdict:
        hits: dict[str, float] = {}
        for form in variants(text):
            self._match(form, hits)
        if _OBFUSCATION_CHARS.search(text) or has_mixed_script(text):
            hits["obfuscation"] = _OBFUSCATION_WEIGHT
        benign = 1.0
        for weight in hits.values():
            benign *= 1.0 - weight
        return InjectionVerdict(score=round(1.0 - benign, 4), rules=tuple(sorted(hits)))

    def _match(self, form: str, hits: dict[str, float]) -> None:
        words = frozenset(_WORD.findall(form))
        boundaries: list[int] | None = None
        matched: set[str] = set()
        for rule in self._rules:
            if rule.name in matched or rule.needs and not rule.needs & (matched | hits.keys()):
                continue
            if rule.gate and not all(group & words for group in rule.gate):
                continue
            if rule.literals and not any(literal in form for literal in rule.literals):
                continue
            if rule.opener is None:
                found = next(rule.matches(form), None) is not None
            else:
                if boundaries is None:
                    boundaries = [m.end() for m in _BOUNDARY.finditer(form)]
                found = any(self._opens(rule, form, m.start(), boundaries) for m in rule.matches(form))
            if found:
                matched.add(rule.name)
        for name in matched:
            hits[name] = _WEIGHTS[name]
        for rule in self._rules:
            if rule.unless & hits.keys():
                hits.pop(rule.name, None)

    @staticmethod
    def _opens(rule: _Rule, form: str, at: int, boundaries: list[int]) -> bool:
        """Whether the sentence holding position `at` starts with the rule's opener."""
        i = bisect.bisect_right(boundaries, at) - 1
        start = boundaries[i] if i >= 0 else 0
        if at - start > _MAX_OPENER_DISTANCE:
            return False
        assert rule.opener is not None
        if rule.adjacent:
            return rule.opener.fullmatch(form, start, at) is not None
        return rule.opener.match(form, start, at) is not None

    def score(self, text: str) -> float:
        return self.verdict(text).score


class InjectionDetector:
    """The detector the guardrails use: a learned classifier when one is configured and answers, else the rules.

    With a classifier the score is the classifier's; the rules still run (they are cheap) so the
    verdict names what they saw, for the audit trail. When the classifier returns None (not available
    yet) the verdict is the rules' alone, without "classifier" among its rules.
    """

    def __init__(self, scope: Scope = "direct", classifier: InjectionClassifier | None = None) -> None:
        self.rules = RuleInjectionDetector(scope)
        self.classifier = classifier

    def verdict(self, text: str) -> InjectionVerdict:
        by_rules = self.rules.verdict(text)
        if self.classifier is None:
            return by_rules
        learned = self.classifier.score(text)
        if learned is None:
            return by_rules
        score = min(1.0, max(0.0, float(learned)))
        return InjectionVerdict(score=score, rules=("classifier", *by_rules.rules))

    def score(self, text: str) -> float:
        return self.verdict(text).score
