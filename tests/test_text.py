"""Text attacks (dlg_jax.text): tokenizer, models, what the gradient gives away, attacks, metrics, CLI.
Tiny on purpose: sentences of 8-12 tokens, a few optimisation steps where an attack iterates."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlg_jax.errors import UsageError
from dlg_jax.models import get_model
from dlg_jax.text import attacks, batch, decode, leakage, metrics
from dlg_jax.text.client import text_client
from dlg_jax.text.corpus import DEMO_SENTENCES, samples, sentences
from dlg_jax.text.tokenizer import encode, get_tokenizer, mask_id
from dlg_jax.text.tokenizer import decode as detokenize

V = get_tokenizer().get_vocab_size()
SMALL = 200  # the attack tests' vocabulary: ids drawn at random (repeats included), quick to compile


def case(name="bert", length=10, n=1, dtype=jnp.float32, seed=0):
    model = get_model(name, SMALL, (16,))
    params = model.init(0, dtype)
    ids = np.random.default_rng(seed).integers(3, 25, size=(n, length))  # [PAD] [UNK] [MASK] are 0, 1, 2
    return model, params, ids, text_client(model, params, ids, mask_id(), seed)


def test_tokenizer_is_deterministic_and_refuses_unknown_characters():
    fresh = get_tokenizer.__wrapped__()
    assert fresh.get_vocab() == get_tokenizer().get_vocab()
    assert detokenize(encode(DEMO_SENTENCES[0])) == DEMO_SENTENCES[0].lower().replace("-", " - ")
    with pytest.raises(UsageError, match="'☃'"):
        encode("a snow ☃ man")
    with pytest.raises(UsageError, match="empty"):
        encode("  ")


def test_sentences_are_prose_of_8_to_24_words():
    s = sentences()
    assert len(s) > 300 and all(8 <= len(x.split()) <= 24 for x in s)
    assert all(len(x) == 16 for x in samples(16, 100))


@pytest.mark.parametrize("name", ["bert", "gpt", "bert-tied"])
def test_text_models_read_ids_or_embeddings(name):
    model = get_model(name, SMALL, (16,))
    params = model.init(0)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, SMALL, size=(2, 8)))
    logits = model.apply(params, ids)
    assert logits.shape == (2, 8, SMALL) and model.input == "tokens"
    np.testing.assert_allclose(model.apply(params, params["token_embedding"][ids]), logits, rtol=1e-6)
    assert ("output_kernel" in params) == (not model.text.tied)
    assert get_model("lenet", 10, (32, 32, 3)).text is None  # image models keep their fields


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_position_rows_sum_to_token_rows_exactly(name, dtype):
    """The key observation: dE[v] is the sum of dP[i] over the positions holding v, bit for bit."""
    with jax.enable_x64(dtype == jnp.float64):
        model, params, ids, client = case(name, 12, dtype=dtype)
        d_e, d_p = np.asarray(client.grads["token_embedding"]), np.asarray(client.grads["position_embedding"])
        summed = np.zeros_like(d_e)
        np.add.at(summed, client.inputs[0], d_p[:12])
        np.testing.assert_array_equal(summed, d_e)
        assert np.all(d_p[12:] == 0) and len(set(client.inputs[0])) < 12  # repeated tokens included
        order = leakage.order_from_positions(client.grads, 12)
        live = 11 if model.text.causal else 12  # a causal LM's last input has no gradient
        np.testing.assert_array_equal(order.ids[:live], client.inputs[0][:live])
        assert order.residual < (1e-5 if dtype == jnp.float32 else 1e-12)


def test_bag_and_bias_labels_are_exact_for_a_masked_lm():
    model, params, ids, client = case("bert", 12)
    np.testing.assert_array_equal(leakage.bag(client.grads), np.unique(client.inputs))
    masked = client.inputs[0] == mask_id()
    np.testing.assert_array_equal(leakage.bias_labels(client.grads), np.unique(ids[0][masked]))


def test_a_tied_head_spoils_the_zero_row_bag():
    model, params, ids, client = case("bert-tied", 8)
    assert len(leakage.bag(client.grads)) == SMALL


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_rows_attack_recovers_sentences_token_for_token(name):
    model, params, ids, client = case(name, 12)
    out = attacks.run_attack(attacks.get_attack("rows"), model, params, client.grads, ids.shape, mask_id())
    assert out.method == "rows" and out.distance < attacks.ACCEPT
    np.testing.assert_array_equal(out.ids, ids)


def cell_gradients(model, params, client):
    """dL/dz of every cell (sentence, position) of the client's batch: the truth the batch reading recovers."""
    emb = params["token_embedding"][client.inputs]
    return np.asarray(jax.grad(lambda x: model.loss(model.apply(params, x), jnp.asarray(client.labels)))(emb))


def test_each_cell_gradient_is_orthogonal_to_its_normalised_input_and_the_peel_finds_true_cells():
    with jax.enable_x64(True):  # LayerNorm's backward pass: g . (z - mean z) = (v . (z - mean z)) eps / (var + eps) / s
        model, params, ids, client = case("bert", 10, n=3, dtype=jnp.float64)
        g = cell_gradients(model, params, client)
        table, positions = np.asarray(params["token_embedding"]), np.asarray(params["position_embedding"])
        cos = lambda y: np.abs(np.sum(g * y, -1)) / np.linalg.norm(g, axis=-1)  # noqa: E731
        z = table[client.inputs] + positions[:10]
        bound = 1e-6 / (z.var(-1) + 1e-6)  # flax's LayerNorm epsilon: the only reason it is not exactly 0
        assert np.all(cos(batch.normalised(z)) <= bound) and cos(batch.normalised(z)).max() < 0.5 * batch.ORTHOGONAL
        assert np.median(cos(batch.normalised(table[client.inputs] + positions[1:11]))) > 10 * batch.ORTHOGONAL
    model, params, _, _ = case("bert", 10)
    ids = np.random.default_rng(1).integers(3, SMALL, size=(3, 10))  # few repeats, as in prose
    client = text_client(model, params, ids, mask_id(), 1)
    g = cell_gradients(model, params, client)
    cells, _, _ = batch.peel(client.grads, params, 3, 10)
    assert len(cells) >= 20
    true = 0
    for c in cells:  # a peeled cell is a (token, position) of the batch, its gradient that cell's (~5% are not)
        rows = np.flatnonzero(client.inputs[:, c.position] == c.token)
        true += len(rows) == 1 and np.linalg.norm(g[rows[0], c.position] - c.gradient) < 1e-3 * np.linalg.norm(c.gradient)
    assert true >= 0.9 * len(cells)


def test_the_bias_gives_each_label_count_and_the_number_of_masked_cells():
    model, params, ids, client = case("bert", 12, n=3)
    labels, counts, total = batch.label_counts(client.grads)
    masked = client.inputs == mask_id()
    truth, truth_counts = np.unique(ids[masked], return_counts=True)
    np.testing.assert_array_equal(labels, truth)
    np.testing.assert_array_equal(counts, truth_counts)
    assert total == masked.sum()


def test_row_distance_sees_a_misplaced_token_that_the_plain_distance_hardly_sees():
    model, params, ids, client = case("bert", 12, n=2, seed=3)
    labels = np.where(client.inputs == mask_id(), ids, -1)
    assert float(batch.row_distance(model, params, client.grads, client.inputs, labels)) < batch.EXACT
    plain = np.flatnonzero((client.inputs[0] != mask_id()) & (client.inputs[0] != client.inputs[0][::-1]))
    i, j = plain[0], plain[-1]
    swapped = client.inputs.copy()
    swapped[0, [i, j]] = swapped[0, [j, i]]
    rows = float(batch.row_distance(model, params, client.grads, swapped, labels))
    flat = float(attacks.relative_distance(model, params, client.grads, swapped, labels))
    assert rows > 1e-3 and rows > 100 * flat  # the masked cells' gradients dominate the plain distance


def test_rows_attack_reads_a_batch_of_sentences_exactly():
    model, params, _, _ = case("bert", 10)
    ids = np.random.default_rng(5).integers(3, 40, size=(3, 10))  # repeats within and across sentences
    client = text_client(model, params, ids, mask_id(), 5)
    out = attacks.run_attack(attacks.get_attack("rows"), model, params, client.grads, ids.shape, mask_id())
    assert out.method == "rows-batch" and out.distance < batch.EXACT
    verdict = metrics.judge(ids, out.ids, lambda row: " ".join(map(str, row)))
    assert verdict["token_accuracy"] == 1.0
    assert [name for name, _ in out.snapshots][0] == "cells (orthogonality)"


def test_optimising_attacks_run_and_decode_within_the_bag():
    model, params, ids, client = case("bert", 8, n=2)
    quick = dataclasses.replace(attacks.get_attack("lamp-cos"), iterations=20, swap_rounds=1, swap_proposals=8)
    out = attacks.run_attack(quick, model, params, client.grads, ids.shape, mask_id())
    assert out.method == "optimise+swaps" and out.ids.shape == ids.shape
    assert set(out.ids.ravel()) <= set(leakage.bag(client.grads)) | set(leakage.bias_labels(client.grads))
    base = dataclasses.replace(attacks.get_attack("dlg-text"), iterations=10)
    assert attacks.run_attack(base, model, params, client.grads, ids.shape, mask_id()).ids.shape == ids.shape


def test_layernorm_aware_decoding_sees_through_scale_and_shift():
    params = get_model("bert", SMALL, (16,)).init(0)
    table, pos = params["token_embedding"], params["position_embedding"]
    ids = jnp.asarray(np.random.default_rng(0).integers(3, SMALL, size=(1, 8)))
    z = 7.0 * (table[ids] + pos[:8]) + 3.0  # LN(z) is LN(e + p): the model reads the same thing
    np.testing.assert_array_equal(decode.nearest_tokens(z - pos[:8], table, pos), ids)
    assert np.mean(np.asarray(decode.plain_nearest(z - pos[:8], table)) == np.asarray(ids)) < 0.5


def test_metrics():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    text = lambda row: " ".join(f"w{t}" for t in row)  # noqa: E731
    r = metrics.judge(truth, truth[::-1].copy(), text)  # swapped sentences are matched back
    assert r["order"] == [1, 0] and r["token_accuracy"] == r["rouge1"] == r["rouge2"] == r["rougeL"] == 1.0
    assert metrics.bag_scores([1, 1, 2], [1, 2, 2, 3]) == (0.5, 2 / 3)
    assert metrics.token_accuracy([1, 2, 3, 4], [1, 2, 4, 3]) == 0.5
    assert 0 <= metrics.rouge("a b c d", "d c b a")["rouge2"] == 0.0


def run_cli(*flags, cwd=None):
    return subprocess.run([sys.executable, "-m", "dlg_jax.run", *flags], capture_output=True, text=True, cwd=cwd)


def test_cli_text_writes_metrics_and_table(tmp_path):
    data = tmp_path / "s.txt"
    data.write_text("\nThe value of the variable is printed.\n\n")
    r = run_cli("--model", "gpt", "--data", str(data), "--out", str(tmp_path / "out"), "--quiet")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["token_accuracy"] == result["rouge2"] == 1.0 and len(result["batches"]) == 1
    assert "| truth | the value of the variable is printed. |" in (tmp_path / "out" / "table.md").read_text()
    assert (tmp_path / "out" / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the same table as an image


@pytest.mark.parametrize("flags, message", [
    (["--model", "bert", "--text", ""], "empty text"),
    (["--model", "bert", "--text", "snow ☃"], "outside the vocabulary: '☃'"),
    (["--model", "bert", "--text", "word " * 70], "at most 64"),
    (["--model", "lenet", "--text", "hello"], "reads images"),
    (["--model", "bert", "--image", "x.png"], "image source"),
    (["--model", "bert", "--preset", "batch"], "image preset"),
    (["--model", "bert", "--preset", "nope"], "invalid choice"),
    (["--model", "bert", "--data", "x.npz"], ".txt"),
])
def test_cli_text_bad_input_is_one_line_and_exit_2(flags, message, tmp_path):
    r = run_cli(*flags, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def run_sweep(*flags):
    return subprocess.run([sys.executable, "-m", "dlg_jax.sweep", "--single-device", *flags],
                          capture_output=True, text=True, timeout=600)


def test_text_sweep_writes_a_row_per_task_resumes_and_summarises(tmp_path):
    data = tmp_path / "s.txt"
    data.write_text("The value of the variable is printed.\nA name refers to an object.\nNames are bound.\n")
    out = tmp_path / "sweep"
    r = run_sweep("--model", "gpt", "--data", str(data), "--indices", "0:2", "--seeds", "0,1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((row["index"], row["seed"]) for row in rows) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(row["status"] == "rows" and row["token_accuracy"] == 1.0 for row in rows)
    assert rows[0]["per_sentence"][0]["recovered"] in ("the value of the variable is printed.", "a name refers to an object.")
    again = run_sweep("--model", "gpt", "--data", str(data), "--indices", "0:3", "--seeds", "0,1", "--out", str(out))
    assert again.returncode == 0 and "resuming: 4 done, 2 to go" in again.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attacks"] == 6 and summary["sentences"] == 6 and summary["share_99"] == 1.0
    other = run_sweep("--model", "gpt", "--data", str(data), "--indices", "0:2", "--preset", "tag", "--out", str(out))
    assert other.returncode == 2 and "another configuration" in other.stderr


@pytest.mark.parametrize("flags, message", [
    (["--processes", "2"], "image-sweep flag"),
    (["--indices", "0:100000"], "only"),
    (["--defense", "prune:0.1"], "image-sweep flag"),
])
def test_text_sweep_bad_input_is_one_line_and_exit_2(flags, message, tmp_path):
    r = run_sweep("--model", "bert", *flags, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
