"""`Guardrails`: a tenant's policy applied to user input, retrieved content and generated output."""

from __future__ import annotations

import logging

from appliance.policy.guardrails.errors import GuardrailBlocked, InputTooLarge
from appliance.policy.guardrails.injection import InjectionClassifier, InjectionDetector
from appliance.policy.guardrails.masking import MaskSession, StreamMasker
from appliance.policy.guardrails.ner import EntitiesUnavailable
from appliance.policy.guardrails.pii import DEFAULT_KINDS, EntityFinder, PiiDetector
from appliance.policy.guardrails.policy import GuardrailPolicy
from appliance.policy.guardrails.types import GuardrailAction, InputDecision, Stage

log = logging.getLogger(__name__)


class Guardrails:
    """Long-lived (build once, share): detectors are stateless and safe to use from several threads.

    `classifier` / `retrieved_classifier`: optional learned injection detectors for user input and for
    retrieved content; without one, or while it returns None (model not loaded yet), the rules decide.
    """

    def __init__(
        self, *, phone_region: str = "US", classifier: InjectionClassifier | None = None,
        retrieved_classifier: InjectionClassifier | None = None, entities: EntityFinder | None = None,
    ) -> None:
        """`entities`: the named-entity finder (ner.LazyEntityDetector); None: pattern kinds only."""
        self.pii = PiiDetector(phone_region, entities=entities)
        self.direct = InjectionDetector("direct", classifier)
        self.indirect = InjectionDetector("indirect", retrieved_classifier)

    def check_input(
        self, text: str, policy: GuardrailPolicy, *, session: MaskSession | None = None
    ) -> InputDecision:
        """Check one user input. Raises InputTooLarge or GuardrailBlocked; otherwise returns the text to
        use (masked when the policy says so) and audit actions.

        Pass one `session` for all messages of a request so placeholders stay consistent across them
        ([EMAIL_1] is the same address in every message); its mapping is reversible iff the policy is.
        """
        if len(text) > policy.max_input_chars:
            raise InputTooLarge(
                f"input is {len(text)} characters; this policy allows at most {policy.max_input_chars}"
            )
        actions: list[GuardrailAction] = []
        verdict = None
        if policy.injection != "allow":
            verdict = self.direct.verdict(text)
            if verdict.is_injection(policy.injection_threshold):
                action = GuardrailAction(stage="input", kind="injection", action=policy.injection, rules=verdict.rules)
                log.info("guardrail: input injection %s (score %.2f, rules %s)", policy.injection, verdict.score,
                         ",".join(verdict.rules))
                if policy.injection == "block":
                    raise GuardrailBlocked("input blocked by guardrail policy: prompt injection", kind="injection")
                actions.append(action)
        if policy.pii_input == "allow":
            return InputDecision(text=text, actions=tuple(actions), injection=verdict)
        findings = self.pii.find(text, self._kinds(policy))
        if not findings:
            return InputDecision(text=text, actions=tuple(actions), injection=verdict)
        counts: dict[str, int] = {}
        for f in findings:
            counts[f.kind] = counts.get(f.kind, 0) + 1
        actions += [GuardrailAction(stage="input", kind=k, action=policy.pii_input, count=n) for k, n in sorted(counts.items())]
        if policy.pii_input == "block":
            raise GuardrailBlocked(f"input blocked by guardrail policy: {', '.join(sorted(counts))}",
                                   kind=min(counts, key=lambda k: (-counts[k], k)))
        if policy.pii_input == "flag":
            return InputDecision(text=text, actions=tuple(actions), injection=verdict)
        session = session or MaskSession(reversible=policy.reversible_mask)
        masked = session.apply(text, findings)
        mapping = dict(session.mapping) if policy.reversible_mask and session.mapping is not None else None
        return InputDecision(text=masked, actions=tuple(actions), mapping=mapping, injection=verdict)

    def check_retrieved(
        self, chunks: list[str], policy: GuardrailPolicy, *, stage: Stage = "retrieved"
    ) -> tuple[list[int], list[GuardrailAction]]:
        """Indices of the chunks to keep, in order, and audit actions for those dropped or flagged.

        Retrieved chunks and tool results (`stage="tool"`) are both third-party content: the indirect
        classifier and rules screen them, and the policy's `retrieved_injection` says what happens."""
        if policy.retrieved_injection == "allow":
            return list(range(len(chunks))), []
        kept: list[int] = []
        hits = 0
        rules: set[str] = set()
        for i, verdict in enumerate(self.indirect.verdicts(chunks)):  # one classifier batch per request
            if verdict.is_injection(policy.injection_threshold):
                hits += 1
                rules.update(verdict.rules)
                if policy.retrieved_injection == "drop":
                    continue
            kept.append(i)
        if not hits:
            return kept, []
        log.info("guardrail: %d %s text(s) with injection, %s", hits, stage, policy.retrieved_injection)
        action = GuardrailAction(stage=stage, kind="injection", action=policy.retrieved_injection,
                                 count=hits, rules=tuple(sorted(rules)))
        return kept, [action]

    def output_masker(self, policy: GuardrailPolicy, *, session: MaskSession | None = None) -> StreamMasker | None:
        """A masker for one generation's output: masks for "mask", counts only for "flag", None for "allow".

        Its `actions()` gives the audit lines once the stream is done.
        """
        if policy.pii_output == "allow":
            return None
        return StreamMasker(self.pii, session=session or MaskSession(), mask_output=policy.pii_output == "mask",
                            kinds=self._kinds(policy))

    def _kinds(self, policy: GuardrailPolicy) -> frozenset[str]:
        """The policy's PII kinds (DEFAULT_KINDS when it names none, less those not installed); raises
        EntitiesUnavailable for named-entity kinds it names that cannot be found here."""
        if policy.pii_kinds is None:
            return DEFAULT_KINDS & self.pii.kinds
        if policy.pii_kinds - self.pii.kinds:
            raise EntitiesUnavailable(sorted(policy.pii_kinds - self.pii.kinds))
        return policy.pii_kinds
