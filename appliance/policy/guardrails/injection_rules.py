"""The prompt-injection rules: patterns over normalised text, and their weights.

Two rule sets. `direct` rules read the user's own input: attempts to override the system prompt,
extract it, or switch the model into an unrestricted persona. `indirect` rules (`indirect_only`) read
third-party content that is about to be placed in the prompt (retrieved documents, emails, tables):
besides the direct rules, any text that speaks to the assistant, tells it how to shape its answer,
gives it a new task, or smuggles in code or links is suspect, because a document has no business
instructing its reader's assistant.

Data only: appliance.policy.guardrails.injection compiles and runs them, and derives each rule's word
gate (the cheap test before its regex) from its pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InjectionRule:
    name: str
    weight: float
    """The rule's share of the score: the score is the noisy-OR of the weights of the rules that matched."""
    pattern: str
    """Over casefolded text, compiled with re.MULTILINE; line breaks are kept as "\\n"."""
    opener: str | None = None
    """For a sentence-initial rule: must match at the start of the sentence that holds the match."""
    adjacent: bool = False
    """The opener must reach exactly to the match (else it may end anywhere before it)."""
    indirect_only: bool = False
    needs: frozenset[str] = frozenset()
    """Counts only when one of these rules matched too (its words alone are common in prose)."""
    unless: frozenset[str] = frozenset()
    """Does not count when one of these matched (docstrings and code comments are imperative by habit)."""


# Building blocks (the text is casefolded; line breaks are kept as "\n").
_SENTENCE = r"(?:[^.!?\n|]|[.!?](?=[^\s.!?]))"
"""A character inside one sentence, line or table cell (a dot inside a URL or a number is not an end)."""
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

_IN_CODE = frozenset({"code_block"})
_CODE_CALLS = frozenset({"code_system_call", "code_network_call"})
_SENTENCE_OPENER = rf"{_LEAD}{_POLITE}"
_ORDINARY_MODES = (
    r"(?:json|dark|light|night|airplane|flight|edit|insert|visual|normal|command|safe|debug|verbose|quiet|silent|"
    r"offline|online|multiline|wordwrap|sleep|power|eco|test|maintenance|kiosk|full[- ]?screen|presentation|"
    r"compatibility|interactive|batch|strict|raw|read[- ]only|focus|reader|reading|private|incognito|guest|"
    r"recovery|setup|tablet|desktop|landscape|portrait|manual|auto|automatic|sport|cruise|overtime)"
)
"""Modes that software and devices have ("enable JSON mode", "switch to dark mode"): not a persona switch."""
_IMPERATIVE_OPENER = rf"{_LEAD}{_POLITE}(?!{_NOT_IMPERATIVE}\b)[a-z][\w'-]*\b"

RULES: tuple[InjectionRule, ...] = (
    # --- direct and indirect ---------------------------------------------------------------------
    InjectionRule(
        "ignore_instructions", 0.9,
        r"\b(?:ignore|disregard|forget|skip|override|bypass|neglect|abandon|discard|set aside|"
        r"pay no (?:attention|heed) to|do not (?:follow|obey)|don'?t (?:follow|obey)|stop following)\b"
        r"(?:\W+\w+){0,5}?\W+(?:instructions?|prompts?|rules|directions|directives?|guidelines|guidance|"
        r"programming|constraints|restrictions|system (?:prompt|message))\b",
    ),
    InjectionRule(
        "ignore_previous", 0.45,
        r"\b(?:ignore|disregard|forget)\W+(?:(?:all|any|the|everything|of|what)\W+){0,3}"
        r"(?:previous|prior|above|preceding|earlier|foregoing|before)\b",
    ),
    InjectionRule(
        "ignore_then_act", 0.8,
        r"\b(?:ignore|disregard|forget)\W+(?:(?:all|any|the|everything|of|what)\W+){0,3}"
        r"(?:previous|prior|above|preceding|earlier|foregoing|before|that)\b\W*(?:\w+\W+){0,4}?"
        r"(?:and|then|instead|now)\W+(?:just\W+)?(?:say|print|write|output|respond|answer|reply|tell|repeat|"
        r"translate|do|follow|act|pretend|return|only)\b",
    ),
    InjectionRule(
        "say_exactly", 0.35,
        r"\b(?:say|print|output|write|respond with|reply with|answer with)\s+(?:exactly|only|just|verbatim)?\s*"
        r"[\"'“‘]",
    ),
    InjectionRule(
        "prompt_leak", 0.85,
        r"\b(?:reveal|show|print|display|output|repeat|leak|tell|give|share|dump|disclose|expose|spell out|"
        r"recite|write out|provide|what (?:is|are|was|were))\b(?:\W+\w+){0,5}?\W+"
        r"(?:system|initial|hidden|secret|original|developer|internal|confidential|pre-?)\W*"
        r"(?:prompts?|instructions?|messages?|rules|guidelines|configuration|directives)\b",
    ),
    InjectionRule(
        "repeat_above", 0.7,
        r"\b(?:repeat|print|output|copy)\b(?:\W+\w+){0,4}?\W+(?:words|text|everything|instructions|lines)\b"
        r"(?:\W+\w+){0,3}?\W+(?:above|before this|preceding)\b",
    ),
    InjectionRule(
        "role_override", 0.6,
        r"\byou are now\b|\bfrom now on,?\s+you\s+(?:are|will be|must|shall|act|respond|answer|reply)\b|"
        r"\byou (?:will|must|shall) now\b",
    ),
    InjectionRule(
        "role_override", 0.6,
        r"\bpretend (?:to be|that you are|you are|you're)\b|\brole[- ]?play(?:ing)?\b(?:\W+\w+){0,3}?\W+as\b|"
        r"\bimagine (?:that )?you are\b|\bhenceforth,? you\b|"
        r"\b(?:switch|enter|activate|enable)(?:ing)?\s+(?:(?!" + _ORDINARY_MODES + r"\b)\w+\s+){0,2}?mode\b",
    ),
    InjectionRule("act_as", 0.35, r"\b(?:act|behave|respond) (?:as|like) (?:an?|the|my|if)\b"),
    InjectionRule(
        "jailbreak", 0.85,
        r"\b(?:do anything now|jailbr(?:eak|oken)\w*|developer mode|dev mode|god mode|"
        r"evil (?:mode|confidant|bot|assistant)|unrestricted (?:mode|ai|assistant|model)|"
        r"(?:no|without (?:any )?)(?:ethical|moral|content) (?:guidelines|constraints|restrictions|filters|limits)|"
        r"uncensored|unfiltered (?:mode|ai|responses?|assistant)|stay in character|"
        r"you are (?:now )?dan|dan mode|as dan)\b",
    ),
    InjectionRule(
        "safety_bypass", 0.6,
        r"\b(?:bypass|disable|ignore|turn off|deactivate|override|circumvent|evade|get around)\b"
        r"(?:\W+\w+){0,3}?\W+(?:safety|content|ethical|moderation|your)\W+(?:\w+\W+)?"
        r"(?:filters?|guardrails?|polic(?:y|ies)|guidelines|restrictions|safeguards|limitations|training)\b",
    ),
    InjectionRule(
        "chat_markup", 0.8,
        r"<\|?(?:im_start|im_end|system|endoftext|eot_id|start_header_id|end_header_id)\|?>|\[/?inst\]|"
        r"<</?sys>>|<start_of_turn>|<end_of_turn>",
    ),
    InjectionRule(
        "role_header", 0.4,
        r"^\s*(?:#{1,4}\s*|\[)?(?:system|assistant)(?: (?:prompt|message|override|instructions?))?\s*[\]:]",
    ),
    InjectionRule(
        "new_instructions", 0.6,
        r"\b(?:new|updated|revised|real|actual|true|secret|hidden|additional|override|priority|important)\s+"
        r"(?:instructions?|directives?|system prompt|orders)\s*:|"
        r"\byour (?:new|real|actual|true|only) (?:task|instructions?|goal|purpose|job|role|mission) (?:is|are)\b",
    ),
    # --- indirect only: content speaking to the assistant ---------------------------------------------
    InjectionRule(
        "addresses_ai", 0.8,
        rf"\b(?:dear|hey|hi|hello|greetings|attention|attn)[ ,:!-]{{1,3}}(?:the |all |any )?{_AI}\b",
        indirect_only=True,
    ),
    InjectionRule(
        "addresses_ai", 0.8,
        rf"\b(?:note|message|memo|reminder|instructions?|notice) (?:to|for) (?:the |all |any )?{_AI}\b",
        indirect_only=True,
    ),
    InjectionRule("addresses_ai", 0.8, rf"\b(?:to|for) you,? (?:the )?{_AI}\b", indirect_only=True),
    InjectionRule(
        "task_hijack", 0.7,
        r"\bbefore (?:you (?:can |could )?|answering|responding|replying|completing|solving|doing)\b"
        r"(?:\w+\W+){0,6}?(?:task|question|request|query|instructions?)\b"
        r"|\b(?:instead of|rather than) (?:answering|responding|replying|summari[sz]ing|doing)\b"
        r"|\b(?:the|your) (?:original|previous|current|real|first) (?:task|question|request) (?:is|was) "
        r"(?:cancel+ed|obsolete|void|done|complete|irrelevant)",
        indirect_only=True,
    ),
    InjectionRule("if_you_are_ai", 0.85, rf"\bif you(?:'re| are) (?:an? |the )?{_AI}\b", indirect_only=True),
    InjectionRule(
        "if_you_are_ai", 0.85,
        rf"\b{_AI}\W+(?:reading|processing|summari[sz]ing|parsing|analy[sz]ing|seeing)\W+(?:this|these|the following)\b",
        indirect_only=True,
    ),
    InjectionRule("if_you_are_ai", 0.85, r"\bas an? (?:ai|language model|assistant),?\s+you\b", indirect_only=True),
    # A sentence that starts like an order and names the reader's answer ("Encode your response in base64").
    InjectionRule(
        "response_directive", 0.75,
        rf"\b{_RESPONSE}",
        opener=rf"{_LEAD}{_POLITE}{_RESPONSE_VERBS}\b", indirect_only=True,
    ),
    InjectionRule("work_directive", 0.6, rf"\b{_YOUR_WORK}", opener=_IMPERATIVE_OPENER, indirect_only=True),
    InjectionRule(
        "code_directive", 0.6,
        rf"\b{_YOUR_CODE}|\b{_POINTER}(?:code|snippet|script|command|function|program|block|excerpt)s?\b",
        opener=_IMPERATIVE_OPENER, indirect_only=True, needs=_CODE_CALLS,
    ),
    InjectionRule(
        "code_directive", 0.6,
        rf"\b{_YOUR_CODE}\s+(?:should|must|could|will|would)\b",
        indirect_only=True, needs=_CODE_CALLS,
    ),
    InjectionRule(
        "response_scope", 0.7,
        rf"(?:in|within|throughout|at the (?:end|start|beginning|top|bottom) of|when (?:writing|giving)|"
        rf"before|after|for)\s+{_RESPONSE}",
        opener=_LEAD, adjacent=True, indirect_only=True,
    ),
    InjectionRule(
        "response_requirement", 0.45,
        rf"\b{_RESPONSE}\s+(?:must|should|shall|needs? to|has to|is to|ought to)\s+(?:\w+\s+)?"
        r"(?:be|contain|include|start|begin|end|use|follow|mention|feature|have)\b",
        indirect_only=True,
    ),
    InjectionRule(
        "respond_in", 0.7,
        r"\b(?:respond|answer|reply|write|speak|talk|communicate|output|express yourself)\b"
        r"(?:\s+(?:only|exclusively|entirely|solely|always|back|everything))?\s+(?:in|using|with)\s+(?:the\s+)?"
        rf"(?:{_LANGUAGES}|{_ENCODINGS})\b",
        indirect_only=True,
    ),
    InjectionRule(
        "encode_output", 0.65,
        r"\b(?:encode|encrypt|encipher|obfuscate|convert|transform|transliterate|render|rewrite|spell)\b"
        rf"{_SENTENCE}{{0,60}}?\b{_ENCODINGS}\b",
        indirect_only=True,
    ),
    InjectionRule(
        "translate_request", 0.55,
        rf"translate\b{_SENTENCE}{{0,60}}?\b(?:into|to|in)\s+{_LANGUAGES}\b",
        opener=_SENTENCE_OPENER, adjacent=True, indirect_only=True,
    ),
    InjectionRule(
        "insert_content", 0.75,
        r"\b(?:include|insert|add|append|prepend|paste|embed|put|place|incorporate|integrate|copy|inject)\b"
        rf"{_SENTENCE}{{0,40}}?\b{_POINTER}{_CONTENT_NOUNS}\b",
        indirect_only=True,
    ),
    InjectionRule(
        "use_code", 0.25,
        r"\b(?:use|utili[sz]e|employ|apply|run|execute|try|leverage|implement|adopt)\b"
        rf"{_SENTENCE}{{0,40}}?\b{_POINTER}(?:code|snippet|script|command|function|program|payload)s?\b",
        indirect_only=True, needs=frozenset({"code_system_call"}),
    ),
    InjectionRule(
        "link_injection", 0.6,
        r"\b(?:include|insert|add|append|embed|inject)\b"
        rf"{_SENTENCE}{{0,50}}?(?:\blinks?\b|\burls?\b|\bhyperlinks?\b|https?://|www\.)",
        indirect_only=True, unless=_IN_CODE,
    ),
    InjectionRule(
        "user_manipulation", 0.65,
        r"\b(?:tell|inform|remind|ask|urge|convince|persuade|encourage|instruct|advise|warn|notify|trick|lure|"
        r"pressure|manipulate|force|request|direct)\s+(?:the|this|that)\s+"
        r"(?:user|reader|human|person|requester|recipient|customer|asker)s?\b",
        indirect_only=True,
    ),
    InjectionRule(
        "when_processing", 0.7,
        rf"\bwhen(?:ever)?\s+(?:you|the\s+{_AI})\s+(?:\w+\s+){{0,2}}?(?:summari[sz]e|answer|respond|process|"
        r"analy[sz]e|generate|are asked|parse|read this|see this|encounter this)\b",
        indirect_only=True,
    ),
    # --- indirect only: a new task for the assistant -------------------------------------------------
    InjectionRule(
        "creative_task", 0.6,
        r"(?:write|compose|draft|generate|create|produce|craft|come up with|make up|invent|"
        r"pen|sing|tell|provide|develop|prepare|give|deliver|put together)\s+(?:me\s+|us\s+)?(?:a|an|some|one|two|"
        r"three|four|five|\d+|short|brief|quick|funny|little)\s+(?:[\w-]+\s+){0,3}?(?:poem|story|stories|essay|"
        r"song|haiku|limerick|joke|riddle|tweet|slogan|article|blog|summary|paragraph|review|letter|speech|recipe|"
        r"script|dialogue|sonnet|rap|verse|lyrics|tagline|headline|fable|fairy tale|anecdote|quote|motto|"
        r"description|list|plan|outline|guide|tips|advice|ideas|names|titles)s?\b",
        opener=_SENTENCE_OPENER, adjacent=True, indirect_only=True, unless=_IN_CODE,
    ),
    InjectionRule(
        "advice_task", 0.5,
        r"(?:recommend|suggest|name|list|provide|give|share|offer|propose|brainstorm)\s+"
        r"(?:me\s+)?(?:a few|a couple of|some|several|two|three|four|five|\d+|the (?:best|top|most)|"
        r"a list of|good|popular|top|useful|interesting|any)\b",
        opener=_SENTENCE_OPENER, adjacent=True, indirect_only=True, unless=_IN_CODE,
    ),
    InjectionRule(
        "explain_task", 0.5,
        r"(?:explain|describe|summari[sz]e|define|teach(?: me)?|elaborate on|discuss|"
        r"compare|analy[sz]e|outline|calculate|compute|solve|research|look up|break down|walk me through|"
        r"clarify|illustrate|tell me (?:about|how|why|what)|show me how)\s+"
        r"(?:how|what|why|the|a|an|to|which|who|when|where|its|their)\b",
        opener=_SENTENCE_OPENER, adjacent=True, indirect_only=True, unless=_IN_CODE,
    ),
    InjectionRule(
        "question_to_ai", 0.45,
        r"\b(?:can|could|would|will) you\s+(?:please\s+)?(?:explain|tell|write|recommend|suggest|list|"
        r"describe|summari[sz]e|translate|teach|generate|create|compose|calculate|solve|show|give|provide|"
        r"help|walk)\b",
        indirect_only=True, unless=_IN_CODE,
    ),
    InjectionRule(
        "translation_question", 0.5,
        rf"\b(?:how (?:do|would|can|does) (?:you|i|one) say|what(?:'s| is| are| does)?)\b{_SENTENCE}{{0,60}}?"
        rf"\b(?:in|into)\s+(?:english|{_LANGUAGES})\s*\?",
        indirect_only=True, unless=_IN_CODE,
    ),
    # --- indirect only: code smuggled into content ---------------------------------------------------
    InjectionRule(
        "code_block", 0.15,
        r"```|^\s*(?:import [\w.]+|from [\w.]+ import|def \w+\(|class \w+[:(]|#include|function\s*\w*\s*\(|"
        r"(?:const|let|var) \w+ ?=|\$ \w|sudo |pip install|npm install|<\?php|<script)",
        indirect_only=True,
    ),
    InjectionRule(
        "code_system_call", 0.4,
        # Calls that run programs, delete files or touch other processes and the OS.
        r"\b(?:os\.(?:system|popen|exec\w*|spawn\w*|remove|unlink|rmdir|removedirs|kill|fork)|subprocess\.\w+|"
        r"shutil\.(?:rmtree|move)|ctypes\.\w+|pty\.spawn|psutil\.\w+|winreg\.\w+)\s*\(|"
        r"\b(?:eval|exec|__import__)\s*\(|\|\s*(?:ba|z)?sh\b|\bpowershell\s+-|\brm\s+-rf\b|\bchmod\s+(?:\+x|777)\b|"
        r"\bdd\s+if=|\bmkfs\b",
        indirect_only=True,
    ),
    InjectionRule(
        "code_network_call", 0.25,
        # Calls that reach the network: everyday in documentation, suspicious with the rules below.
        r"\b(?:socket\.\w+|requests\.(?:get|post|put|patch|delete|request|session)|urllib\d?\.(?:request\.)?\w+|"
        r"http\.client\.\w+|httpx\.\w+|aiohttp\.\w+|smtplib\.\w+|ftplib\.\w+|paramiko\.\w+|telnetlib\.\w+|"
        r"webbrowser\.open\w*)\s*\(",
        indirect_only=True,
    ),
    InjectionRule(
        "code_sensitive_target", 0.3,
        # Families of malware behaviour: stealing cookies, keys, environment or memory, keylogging, mining,
        # spam, scanning and spreading, destroying the system, enumerating hardware.
        r"\bcookie(?:s|jar)?\b|\bbrowser_cookie|\bos\.environ\b|\bgetenv\b|/etc/(?:passwd|shadow)|~/\.ssh|\bid_rsa\b|"
        r"\.bash_history|\bkeylog\w*|\bpynput\b|\bprocess_iter\b|/proc/|/dev/(?:mem|sd\w|zero|random|urandom)\b|"
        r"\breadprocessmemory\b|\bmemory_(?:maps|info)\b|\bxmrig\b|stratum\+tcp|\bcrypto ?min\w*|\bminer\b|"
        r"\bhashrate\b|\bsendmail\b|\bspam\w*|\bport ?scan\w*|\bnmap\b|\bpropagat\w*|\bworm\b|\bbotnet\b|"
        r"\bexploit\w*|\bshellcode\b|\bpayload\b|\bbackdoor\b|\breverse shell\b|\bsudo rm\b|\bshutdown\b|"
        r"\breboot\b|\bsystemctl (?:stop|disable|mask)\b|\biptables -f\b|\busb\.core\b|\blsusb\b|\blspci\b|"
        r"\bwmic\b|\bdmidecode\b|\bpasswords?\b|\bcredentials?\b|\bwallet\b|\brecycle\b|\btrash\b",
        indirect_only=True, needs=_CODE_CALLS,
    ),
)

OBFUSCATION_CHARS = re.compile("[\u200b\u200c\u200e\u200f\u2060-\u2064\ufeff\u202a-\u202e\U000e0000-\U000e007f]")
"""Invisible characters that hide words from people (and from rules before normalisation)."""
OBFUSCATION_WEIGHT = 0.35
"""The weight of "obfuscation": such characters, or words mixing scripts, in the raw text."""
