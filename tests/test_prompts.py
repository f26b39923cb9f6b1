"""Prompt formats and loss on responses: the text a record becomes, which tokens carry loss, and that every loss
(training step, evaluation, block, full and LoRA visits) is the mean over exactly those tokens."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedcybgd.common.data import pack_sequences, tokenize_documents
from fedcybgd.common.eval import causal_lm_loss, evaluate_loss
from fedcybgd.common.lm_loss import IGNORE_INDEX
from fedcybgd.common.partition import partition_model
from fedcybgd.common.prompts import ALPACA_TEMPLATE, PromptFormat, render_document, resolve_prompt_format
from fedcybgd.common.records import Document
from fedcybgd.common.sequences import Sequences
from fedcybgd.common.tiny import EOS_TOKEN, make_byte_tokenizer, make_tiny_model
from fedcybgd.training import VisitHyper, train_block, train_full, train_lora
from fedcybgd.training.loop import visit_rows

torch.set_num_threads(1)

ALPACA = PromptFormat(ALPACA_TEMPLATE, "alpaca")
INSTRUCTION = Document(messages=(("user", "Say hi\n\nto Bob"), ("assistant", "Hi Bob")), source="data.jsonl:3",
                       instruction=("Say hi", "to Bob"))


@pytest.fixture(scope="module")
def base_tok():
    return make_byte_tokenizer(chat_template=False)


@pytest.fixture(scope="module")
def chat_tok():
    return make_byte_tokenizer()


# ------------------------------------------------------------------------------------------- formatting


def test_alpaca_layout_with_and_without_input(base_tok):
    text = render_document(INSTRUCTION, ALPACA, base_tok).text
    assert text == ("Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response that appropriately completes the request.\n\n"
                    "### Instruction:\nSay hi\n\n### Input:\nto Bob\n\n### Response:\nHi Bob" + EOS_TOKEN)
    plain = Document(messages=(("user", "Say hi"), ("assistant", "Hi")), instruction=("Say hi", ""))
    assert render_document(plain, ALPACA, base_tok).text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi\n\n### Response:\nHi" + EOS_TOKEN)


def test_alpaca_chat_with_system_and_two_turns(base_tok):
    doc = Document(messages=(("system", "Be brief."), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"),
                             ("assistant", "A2")))
    rendered = render_document(doc, ALPACA, base_tok)
    assert rendered.text == (f"Be brief.\n\n### Instruction:\nQ1\n\n### Response:\nA1{EOS_TOKEN}\n\n"
                             f"### Instruction:\nQ2\n\n### Response:\nA2{EOS_TOKEN}")
    assert [rendered.text[a:b] for a, b in rendered.spans] == [f"A1{EOS_TOKEN}", f"A2{EOS_TOKEN}"]


def test_alpaca_refuses_unknown_roles(base_tok):
    doc = Document(messages=(("user", "q"), ("tool", "x"), ("assistant", "a")), source="f.jsonl:9")
    with pytest.raises(ValueError, match=r"f\.jsonl:9: .*not tool"):
        render_document(doc, ALPACA, base_tok)


def test_response_spans_with_the_tokenizers_chat_template(chat_tok):
    fmt = resolve_prompt_format("auto", "responses", chat_tok)
    assert fmt.name == "tokenizer"
    rendered = render_document(INSTRUCTION, fmt, chat_tok)
    assert rendered.text == "<|im_start|>user\nSay hi\n\nto Bob<|im_end|>\n<|im_start|>assistant\nHi Bob<|im_end|>\n"
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["Hi Bob<|im_end|>\n"]


def test_resolving_the_format(base_tok, chat_tok, tmp_path):
    assert resolve_prompt_format("auto", "responses", base_tok).template == ALPACA_TEMPLATE
    assert resolve_prompt_format("alpaca", "all", chat_tok) == PromptFormat(ALPACA_TEMPLATE, "alpaca", "all")
    with pytest.raises(ValueError, match="no chat template"):
        resolve_prompt_format("tokenizer", "responses", base_tok)
    with pytest.raises(ValueError, match="neither"):
        resolve_prompt_format(str(tmp_path / "missing.jinja"), "responses", base_tok)
    with pytest.raises(ValueError, match="train_on"):
        resolve_prompt_format("alpaca", "prompts", base_tok)
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    mine = resolve_prompt_format(str(tmp_path / "mine.jinja"), "responses", base_tok)
    assert mine.name == "mine.jinja" and mine.digest != ALPACA.digest
    assert render_document(INSTRUCTION, mine, base_tok).text == "<user>Say hi\n\nto Bob<assistant>Hi Bob"


def test_a_template_that_rewrites_earlier_turns_is_refused_with_responses_only(base_tok):
    # Renders the last message differently from the others: a prefix of the conversation is not a prefix of it.
    template = "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}|{% endif %}" \
               "{% endfor %}"
    with pytest.raises(ValueError, match="turn by turn"):
        render_document(INSTRUCTION, PromptFormat(template, "odd.jinja"), base_tok)
    assert render_document(INSTRUCTION, PromptFormat(template, "odd.jinja", "all"), base_tok).all_trained


def test_a_conversation_without_a_response_is_an_error_naming_it(base_tok):
    with pytest.raises(ValueError, match=r"q\.jsonl:2: no assistant response"):
        render_document(Document(messages=(("user", "q"),), source="q.jsonl:2"), ALPACA, base_tok)


# ---------------------------------------------------------------------------------------------- labels


def test_labels_mark_exactly_the_response_tokens(base_tok):
    stream = tokenize_documents([Document(text="ab"), INSTRUCTION], base_tok, ALPACA)
    assert stream.labels is not None and len(stream.labels) == len(stream.ids)
    trained = [i for i, label in enumerate(stream.labels) if label != IGNORE_INDEX]
    assert all(stream.labels[i] == stream.ids[i] for i in trained)
    # Plain text ("ab" + EOS) carries loss throughout; the instruction only its response "Hi Bob" + EOS.
    assert base_tok.decode([stream.ids[i] for i in trained]) == f"ab{EOS_TOKEN}Hi Bob{EOS_TOKEN}"
    assert trained[-7:] == list(range(len(stream.ids) - 7, len(stream.ids)))  # the response is the tail


def test_train_on_all_and_plain_text_have_no_labels(base_tok):
    assert tokenize_documents([INSTRUCTION], base_tok, PromptFormat(ALPACA_TEMPLATE, train_on="all")).labels is None
    assert tokenize_documents([Document(text="plain")], base_tok, ALPACA).labels is None


def test_slow_tokenizer_path_gives_the_same_labels(base_tok):
    class Slow:  # the same tokenizer without offsets: encodes the trained and untrained stretches apart
        def __init__(self, tok):
            self._tok = tok
            self.is_fast = False
            self.eos_token_id = tok.eos_token_id

        def __call__(self, text, **kw):
            kw.pop("return_offsets_mapping", None)
            return self._tok(text, **kw)

        def apply_chat_template(self, *a, **kw):
            return self._tok.apply_chat_template(*a, **kw)

    fast = tokenize_documents([INSTRUCTION], base_tok, ALPACA)
    assert tokenize_documents([INSTRUCTION], Slow(base_tok), ALPACA) == fast


# ------------------------------------------------------------------------------------------------ losses


def _by_hand(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean of -log p(label[t+1] | ids[..t]) over the positions whose label counts, one token at a time."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    total, count = 0.0, 0
    for row in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            target = int(labels[row, t + 1])
            if target != IGNORE_INDEX:
                total -= float(F.log_softmax(logits[row, t], dim=-1)[target])
                count += 1
    return total / count


@pytest.fixture(scope="module")
def instruction_data(base_tok) -> Sequences:
    docs = [Document(messages=(("system", "Count."), ("user", f"to {n}"),
                               ("assistant", " ".join(map(str, range(1, n + 1)))))) for n in range(2, 14)]
    data = pack_sequences(tokenize_documents(docs, base_tok, ALPACA), 48)
    assert data.labels is not None
    assert all(data.loss_tokens(torch.tensor([r])) > 0 for r in range(len(data)))
    assert data.loss_tokens() < data.ids.numel() / 2  # mostly prompts: a loss over everything would differ
    return data


def test_loss_is_the_mean_over_response_tokens_only(instruction_data):
    model = make_tiny_model("llama", seed=1).eval()
    ids, labels = instruction_data.ids[:3], instruction_data.labels[:3]
    expected = _by_hand(model, ids, labels)
    with torch.no_grad():
        assert math.isclose(float(causal_lm_loss(model, ids, labels)), expected, rel_tol=1e-5)
        everything = float(causal_lm_loss(model, ids))
    assert not math.isclose(everything, expected, rel_tol=1e-3)  # the prompts would change it
    # Evaluation over several batches weights each by its response tokens: the mean over all of them.
    assert math.isclose(evaluate_loss(model, instruction_data[:3], batch_size=2), expected, rel_tol=1e-5)


def _visit(kind: str, data: Sequences, hyper: VisitHyper):
    model = make_tiny_model("llama", seed=1).eval()
    if kind == "block":
        spec = next(s for s in partition_model(model, 1) if s.name == "layers.3")
        return model, train_block(model, spec, data, hyper)
    if kind == "full":
        return model, train_full(model, data, hyper)
    return model, train_lora(model, data, hyper)


@pytest.mark.parametrize("kind", ["block", "full", "lora"])
def test_every_kind_of_visit_trains_on_responses_only(instruction_data, kind):
    hyper = VisitHyper(lr=1e-3, steps=2, batch_size=2, seq_len=48, seed=0, eval_batches=1)
    eval_rows = visit_rows(instruction_data, hyper)[0][0]
    assert instruction_data.labels is not None
    model, result = _visit(kind, instruction_data, hyper)
    expected = _by_hand(make_tiny_model("llama", seed=1).eval(), instruction_data.ids[eval_rows],
                        instruction_data.labels[eval_rows])
    assert math.isclose(result.loss_before, expected, rel_tol=1e-5)
    # The labels reach the gradient: the same visit with loss on every token trains something else.
    _, everything = _visit(kind, Sequences(instruction_data.ids), hyper)
    assert any(not torch.equal(everything.tensors[k], result.tensors[k]) for k in result.tensors)


def test_records_the_format_cannot_lay_out_are_errors_or_skipped_and_counted(base_tok):
    docs = [INSTRUCTION, Document(messages=(("user", "q"),), source="q.jsonl:2"), Document(text="t")]
    with pytest.raises(ValueError, match=r"q\.jsonl:2"):
        tokenize_documents(docs, base_tok, ALPACA)
    stream = tokenize_documents(docs, base_tok, ALPACA, skip_invalid=True)
    assert stream.skipped == 1 and "q.jsonl:2" in stream.skip_examples[0]
    assert stream.ids == tokenize_documents([docs[0], docs[2]], base_tok, ALPACA).ids


def test_templates_that_print_the_date_see_a_fixed_one(base_tok):
    # Llama 3.x's templates print "Today Date" through strftime_now: formatting must not depend on the clock.
    template = "{{ strftime_now('%d %b %Y') }}\n{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert render_document(INSTRUCTION, PromptFormat(template, "dated.jinja", "all"), base_tok).text == \
        "26 Jul 2024\nSay hi\n\nto BobHi Bob"
