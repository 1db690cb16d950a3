"""The shapes training script (rexedge.export.shapes.train) on the tiny config: it learns, resumes exactly,
and writes a checkpoint in the published layout."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import pytest
import torch

from rexedge.export.shapes.scenes import CATEGORIES, make_scene
from rexedge.export.shapes.train import (
    CHECKPOINT_DIR,
    LOG_FILE,
    SLOTS,
    STATE_FILE,
    AttentionProbe,
    Trainer,
    TrainOptions,
    coord_sigma,
    coordinate_embeddings,
    forward_loss,
    lookup_loss,
    make_example,
    match_loss,
    open_trainer,
    scene_seed,
    shapes_tokenizer,
    train,
)
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.model.checkpoint import load_model
from rexedge.runtime.model.compact import KVCache
from rexedge.runtime.request.preprocess import preprocess
from rexedge.runtime.request.prompts import box_to_bins
from rexedge.runtime.request.tokenizer import Tokenizer

# 112 x 112 px (16 image tokens): quick, and still every scene of the domain
TINY = TrainOptions(preset="tiny", batch_size=2, lr=3e-3, warmup_steps=1, decay_steps=100, curriculum_steps=2,
                    min_pixels=16 * 28 * 28, max_pixels=16 * 28 * 28)


def held_out_loss(trainer: Trainer) -> float:
    """Loss on fixed scenes never used in training (seeds past the training range)."""
    o = trainer.options
    examples = [make_example(make_scene(2**41 + i), trainer.tokenizer, trainer.cfg, o.min_pixels, o.max_pixels)
                for i in range(4)]
    with torch.no_grad():
        loss, _ = forward_loss(trainer.model, examples, trainer.tokenizer.ids, o.coord_sigma)
    return float(loss)


def test_loss_decreases(tmp_path: Path) -> None:
    trainer = open_trainer(tmp_path, TINY)
    before = held_out_loss(trainer)
    for _ in range(12):
        trainer.train_step()
    after = held_out_loss(trainer)
    # the answer's format (specials, names, separators) is learned within a few steps
    assert after < before - 1.0, (before, after)


def test_resume_continues_with_identical_state(tmp_path: Path) -> None:
    straight = train(tmp_path / "straight", steps=4, options=TINY, log_every=2)
    train(tmp_path / "resumed", steps=2, options=TINY, log_every=2)
    # a resumed run keeps the options it was started with, whatever is passed now
    resumed = train(tmp_path / "resumed", steps=4, options=TrainOptions(), log_every=2)
    assert resumed.step == straight.step == 4
    assert resumed.options == TINY
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key]), key
    log = (tmp_path / "resumed" / "train.log").read_text().splitlines()
    assert [line.split(",")[0] for line in log] == ['{"step": 2', '{"step": 4']


def test_checkpoint_is_the_trained_model(tmp_path: Path) -> None:
    trainer = train(tmp_path, steps=2, options=TINY, log_every=1)
    loaded = load_model(tmp_path / CHECKPOINT_DIR)
    trained = trainer.model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert set(loaded.state_dict()) == set(trained)
    # with the tokenizer it was trained with: the category names as the same whole-word ids (a checkpoint
    # once shipped the plain tiny tokenizer, so every evaluation read the names as other tokens)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / CHECKPOINT_DIR / name).read_bytes() == (tmp_path / "tokenizer" / name).read_bytes()
    shipped = Tokenizer.from_dir(tmp_path / CHECKPOINT_DIR)
    assert all(shipped.encode_text(c) == trainer.tokenizer.encode_text(c) for c in CATEGORIES)


def test_scene_seeds_are_distinct_and_clear_of_evaluation() -> None:
    seeds = {scene_seed(0, step, i, 16) for step in range(50) for i in range(16)}
    assert len(seeds) == 50 * 16
    assert scene_seed(3, 10**6, 63, 64) < 2**40  # evaluation scenes start at 2**40


def test_unknown_preset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RexEdgeError, match="synthetic vocabulary"):
        open_trainer(tmp_path, TrainOptions(preset="cpu-bench"))


def test_sigterm_stops_after_the_step_and_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step = Trainer.train_step

    def step_then_signal(self: Trainer) -> dict[str, float]:
        metrics = step(self)
        if self.step == 2:
            signal.raise_signal(signal.SIGTERM)
        return metrics

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    trainer = train(tmp_path, steps=50, options=TINY, log_every=100, save_every_s=1e9)
    assert trainer.step == 2
    assert torch.load(tmp_path / STATE_FILE, weights_only=False)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_coord_sigma_goes_from_coarse_to_fine() -> None:
    options = TrainOptions(coord_sigma=3.0, coord_sigma_start=48.0, coord_sigma_steps=400)
    sigmas = [coord_sigma(options, step) for step in (0, 100, 200, 400, 1000)]
    assert sigmas[0] == pytest.approx(48.0) and sigmas[3] == sigmas[4] == pytest.approx(3.0)
    assert sigmas[1] == pytest.approx(48.0 / 2)  # geometric: halves every 100 of these 400 steps
    assert sigmas[2] == pytest.approx(12.0)
    assert coord_sigma(TrainOptions(coord_sigma=3.0), 0) == 3.0


def test_coordinate_embeddings_are_smooth_in_the_bin() -> None:
    table = coordinate_embeddings(1000, 64, seed=0, std=0.05)
    assert table.shape == (1000, 64)
    assert table.std().item() == pytest.approx(0.05, rel=0.2)
    unit = torch.nn.functional.normalize(table, dim=1)
    near = (unit[:-1] * unit[1:]).sum(dim=1).mean()
    far = (unit[:-300] * unit[300:]).sum(dim=1).mean()
    assert near > 0.4 > 0.1 > far  # neighbours alike, distant bins not


def test_position_loss_targets_each_image_tokens_own_row_and_column(tmp_path: Path) -> None:
    trainer = open_trainer(tmp_path, TrainOptions(preset="tiny", min_pixels=16 * 28 * 28, max_pixels=48 * 28 * 28))
    o, model = trainer.options, trainer.model
    scenes = [s for s in map(make_scene, range(2**41, 2**41 + 40)) if s.size[0] > 1.5 * s.size[1]][:1] + [make_scene(5)]
    examples = [make_example(s, trainer.tokenizer, trainer.cfg, o.min_pixels, o.max_pixels) for s in scenes]
    coord_rows = model.head_weight[trainer.coord_start:trainer.coord_start + trainer.num_coords].detach()
    # the readout an oracle would give: the coordinate row of each token's column, then of its row,
    # from the preprocessed grid (raster order), scaled so that the softmax peaks there
    readouts = []
    for scene in scenes:
        rows, cols = preprocess(scene.image, o.min_pixels, o.max_pixels, cfg=trainer.cfg).merged_grid_hw
        for k in range(rows * cols):
            x, y = int((k % cols + 0.5) / cols * 999), int((k // cols + 0.5) / rows * 999)
            readouts.append(torch.stack([coord_rows[b] * 40 / coord_rows[b].pow(2).sum() for b in (x, y)]).flatten())
    oracle = torch.stack(readouts)

    class Twice(torch.nn.Module):  # the trainer's readout at initialisation: the hidden state, for both axes
        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return torch.cat([hidden, hidden], dim=-1)

    class Oracle(torch.nn.Module):
        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            assert hidden.shape[0] == oracle.shape[0]
            return oracle

    with torch.no_grad():
        _, metrics = forward_loss(model, examples, trainer.tokenizer.ids, o.coord_sigma,
                                  Oracle(), 1.0)
        _, untrained = forward_loss(model, examples, trainer.tokenizer.ids, o.coord_sigma,
                                    Twice(), 1.0)
    assert metrics["aux_mae"] < 5 < 100 < untrained["aux_mae"]


def test_object_loss_targets_the_box_and_category_under_each_image_token(tmp_path: Path) -> None:
    trainer = open_trainer(tmp_path, TrainOptions(preset="tiny", min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28))
    o, model = trainer.options, trainer.model
    scenes = [s for s in map(make_scene, range(2**41, 2**41 + 60)) if len(s.shapes) >= 3][:2] + [make_scene(7)]
    examples = [make_example(s, trainer.tokenizer, trainer.cfg, o.min_pixels, o.max_pixels) for s in scenes]
    coord_rows = model.head_weight[trainer.coord_start:trainer.coord_start + trainer.num_coords].detach()
    # an oracle from the scene itself: the shape (smallest box wins) whose pixel box holds the
    # centre of each merged cell of the preprocessed grid, in raster order
    boxes, classes = [], []
    for scene in scenes:
        rows, cols = preprocess(scene.image, o.min_pixels, o.max_pixels, cfg=trainer.cfg).merged_grid_hw
        width, height = scene.size
        for k in range(rows * cols):
            x, y = (k % cols + 0.5) / cols * width, (k // cols + 0.5) / rows * height
            under = [s for s in scene.shapes if s.box[0] <= x <= s.box[2] and s.box[1] <= y <= s.box[3]]
            shape = min(under, key=lambda s: (s.box[2] - s.box[0]) * (s.box[3] - s.box[1]), default=None)
            classes.append(CATEGORIES.index(shape.category) if shape else len(CATEGORIES))
            if shape:
                boxes.append(torch.stack([coord_rows[b] * 40 / coord_rows[b].pow(2).sum()
                                          for b in box_to_bins(shape.box, scene.size)]).flatten())
    assert len(boxes) > 10 and len(classes) - len(boxes) > 10

    class Oracle(torch.nn.Module):
        def __init__(self, table: torch.Tensor) -> None:
            super().__init__()
            self.table = table

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            assert hidden.shape[0] == self.table.shape[0]
            return self.table

    oracle = torch.nn.ModuleDict({"box": Oracle(torch.stack(boxes)),
                                  "category": Oracle(torch.nn.functional.one_hot(torch.tensor(classes)) * 50.0)})
    with torch.no_grad():
        _, metrics = forward_loss(model, examples, trainer.tokenizer.ids, o.coord_sigma,
                                  dense=oracle, box_weight=1.0, class_weight=1.0)
        fresh = Trainer(TrainOptions(preset="tiny", box_weight=1.0, class_weight=1.0), trainer.tokenizer).dense
        _, untrained = forward_loss(model, examples, trainer.tokenizer.ids, o.coord_sigma,
                                    dense=fresh, box_weight=1.0, class_weight=1.0)
    assert metrics["class_acc"] == 1.0 and untrained["class_acc"] < 0.9
    assert metrics["box_mae"] < 5 < 100 < untrained["box_mae"]


def cells_under(scene, shape, merged_grid_hw: tuple[int, int], image_index: torch.Tensor) -> list[int]:
    """An oracle from the scene itself: the sequence indices of the merged cells whose centre lies in
    ``shape``'s pixel box, the smallest box winning where boxes overlap."""
    (rows, cols), (width, height) = merged_grid_hw, scene.size
    cells = []
    for k in range(rows * cols):
        x, y = (k % cols + 0.5) / cols * width, (k // cols + 0.5) / rows * height
        under = [s for s in scene.shapes if s.box[0] <= x <= s.box[2] and s.box[1] <= y <= s.box[3]]
        if min(under, key=lambda s: (s.box[2] - s.box[0]) * (s.box[3] - s.box[1]), default=None) is shape:
            cells.append(int(image_index[k]))
    return cells


def test_lookup_loss_wants_the_answer_to_attend_to_the_box_it_writes(tmp_path: Path) -> None:
    trainer = open_trainer(tmp_path, TrainOptions(preset="tiny", min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28))
    o, cfg, ids = trainer.options, trainer.cfg, trainer.tokenizer.ids
    scenes = [s for s in map(make_scene, range(2**41, 2**41 + 60)) if len(s.shapes) >= 3][:2] + [make_scene(7)]
    examples = [make_example(s, trainer.tokenizer, cfg, o.min_pixels, o.max_pixels) for s in scenes]
    length = max(len(e.input_ids) for e in examples)
    padded = torch.full((len(examples), length), ids.endoftext)
    positions = torch.zeros((3, len(examples), length), dtype=torch.int64)
    # an oracle from the scene itself: the answer's boxes in writing order, each one's merged cells
    # (centre inside its pixel box, the smallest box winning) as sequence indices, and the four
    # positions that write its coordinates attending evenly to them
    oracle = torch.full((len(examples), length, length), 1.0 / length)
    # the same with a head per slot: head s on the box where slot s is written, on <|vision_start|> elsewhere
    slotted = torch.full((len(examples), SLOTS, length, length), 1.0 / length)
    absent = 0
    for b, (scene, example) in enumerate(zip(scenes, examples)):
        padded[b, :len(example.input_ids)] = torch.from_numpy(example.input_ids)
        positions[:, b, :len(example.input_ids)] = torch.from_numpy(example.positions)
        grid = preprocess(scene.image, o.min_pixels, o.max_pixels, cfg=cfg).merged_grid_hw
        image_index = (padded[b] == cfg.image_token_id).nonzero()[:, 0]
        vision_start = int((padded[b] == cfg.vision_start_token_id).nonzero()[0, 0])
        written = [i for i in range(example.num_prompt, len(example.input_ids))
                   if ids.coord_start <= example.input_ids[i] < ids.coord_start + ids.num_coords][::4]
        answer_boxes = [box for _, boxes in scene.answer_groups() for box in boxes or ()]
        assert len(written) == len(answer_boxes) == len(scene.shapes)
        for first, bins in zip(written, answer_boxes):
            shape = next(s for s in scene.shapes if box_to_bins(s.box, scene.size) == bins)
            cells = cells_under(scene, shape, grid, image_index)
            for slot, query in enumerate(range(first - 1, first + 3)):
                oracle[b, query] = 0.0
                oracle[b, query, cells] = 1.0 / len(cells)
                slotted[b, :, query] = 0.0
                slotted[b, :, query, vision_start] = 1.0
                slotted[b, slot, query] = 0.0
                slotted[b, slot, query, cells] = 1.0 / len(cells)
        # a category answered None: the look-up found nothing and rests on <|vision_start|>
        for query in range(example.num_prompt - 1, len(example.input_ids) - 1):
            if example.input_ids[query] == ids.box_start and example.input_ids[query + 1] == ids.none[0]:
                oracle[b, query] = 0.0
                oracle[b, query, vision_start] = 1.0
                slotted[b, :, query] = 0.0
                slotted[b, :, query, vision_start] = 1.0
                absent += 1
    assert absent == sum(len(s.categories) - len({shape.category for shape in s.shapes}) for s in scenes) > 0
    lookup = lookup_loss({3: oracle[:, None]}, padded, positions, examples, cfg, ids)
    uniform = lookup_loss({3: torch.full_like(oracle[:, None], 1.0 / length)}, padded, positions, examples, cfg, ids)
    assert lookup[1]["lookup_mass"] == pytest.approx(1.0) and float(lookup[0]) < 1e-4
    assert uniform[1]["lookup_mass"] < 0.2 and float(uniform[0]) > 1.5
    by_slot = lookup_loss({2: slotted, 3: slotted}, padded, positions, examples, cfg, ids, slots=True)
    all_on_box = lookup_loss({3: oracle[:, None].expand(-1, SLOTS, -1, -1)}, padded, positions, examples, cfg, ids,
                             slots=True)
    assert by_slot[1]["lookup_mass"] == pytest.approx(1.0) and float(by_slot[0]) < 1e-4
    # every head on the box at every slot: right for a quarter of the box positions' heads, and for None
    assert all_on_box[1]["lookup_mass"] < 0.6 and float(all_on_box[0]) > 5


def test_match_loss_wants_query_and_keys_to_name_the_asked_and_the_underlying_category(tmp_path: Path) -> None:
    trainer = open_trainer(tmp_path, TrainOptions(preset="tiny", min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28))
    o, cfg, ids = trainer.options, trainer.cfg, trainer.tokenizer.ids
    scenes = [s for s in map(make_scene, range(2**41, 2**41 + 60)) if len(s.shapes) >= 3][:2] + [make_scene(7)]
    examples = [make_example(s, trainer.tokenizer, cfg, o.min_pixels, o.max_pixels) for s in scenes]
    length, classes = max(len(e.input_ids) for e in examples), len(CATEGORIES) + 1
    padded = torch.full((len(examples), length), ids.endoftext)
    positions = torch.zeros((3, len(examples), length), dtype=torch.int64)
    # oracle queries and keys: the category one-hot in the first dimensions of head 0, read by an identity
    queries = torch.zeros((len(examples), 1, length, cfg.head_dim))
    keys = torch.zeros((len(examples), 1, length, cfg.head_dim))
    for b, (scene, example) in enumerate(zip(scenes, examples)):
        n = len(example.input_ids)
        padded[b, :n] = torch.from_numpy(example.input_ids)
        positions[:, b, :n] = torch.from_numpy(example.positions)
        starts = [i for i in range(example.num_prompt, n) if example.input_ids[i] == ids.box_start]
        assert len(starts) == len(scene.categories)  # one group per asked category, in prompt order
        for start, category in zip(starts, scene.categories):
            queries[b, 0, start, CATEGORIES.index(category)] = 30.0
        image_index = (padded[b] == cfg.image_token_id).nonzero()[:, 0]
        keys[b, 0, image_index, len(CATEGORIES)] = 30.0   # background unless a shape is under the token
        grid = preprocess(scene.image, o.min_pixels, o.max_pixels, cfg=cfg).merged_grid_hw
        for shape in scene.shapes:
            cells = cells_under(scene, shape, grid, image_index)
            keys[b, 0, cells] = 0.0
            keys[b, 0, cells, CATEGORIES.index(shape.category)] = 30.0
    readout = torch.nn.Linear(cfg.head_dim, classes)
    with torch.no_grad():
        readout.weight.zero_()
        readout.weight[:, :classes] = torch.eye(classes)
        readout.bias.zero_()
    match = torch.nn.ModuleDict({"1": readout})
    loss, metrics = match_loss(match, {1: queries}, {1: keys}, padded, positions, examples, cfg, ids.box_start)
    assert float(loss.detach()) < 1e-4 and metrics == {"match_query_acc": 1.0, "match_key_acc": 1.0}
    # a query naming the next category, keys all background: each side's accuracy counts its own mistakes
    wrong = torch.zeros_like(queries)
    wrong[..., 1:classes - 1] = queries[..., :classes - 2]
    wrong[..., 0] = queries[..., classes - 2]
    background = torch.zeros_like(keys)
    background[..., len(CATEGORIES)] = 30.0
    loss, metrics = match_loss(match, {1: wrong}, {1: background}, padded, positions, examples, cfg, ids.box_start)
    assert metrics["match_query_acc"] == 0.0 and 0.3 < metrics["match_key_acc"] < 1.0 and float(loss.detach()) > 5


def test_attention_probe_keeps_the_probabilities_the_attention_used(tmp_path: Path) -> None:
    trainer = open_trainer(tmp_path, TrainOptions(preset="tiny"))
    cfg, model = trainer.cfg, trainer.model
    torch.manual_seed(3)
    length = 23
    embeds = torch.randn(2, length, cfg.hidden_size)
    positions = torch.randint(0, 40, (3, 2, length))
    outputs = {}

    class Probe(AttentionProbe):
        def attention(self, q, k, v, cos, sin, key_cache, value_cache, cache_position, context):
            layer = self._layer
            out = super().attention(q, k, v, cos, sin, key_cache, value_cache, cache_position, context)
            outputs[layer] = (out.clone(), value_cache[:, :, :length].clone())
            return out

    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    assert heads > kv_heads > 1   # grouped-query attention, so the probe must pick each head's kv head
    probe = Probe(range(1, cfg.num_hidden_layers), heads=heads)
    with torch.no_grad():
        model.decode(embeds, positions, KVCache.allocate(cfg, 2, length), torch.arange(length), length, ops=probe)
    assert sorted(probe.probs) == list(range(1, cfg.num_hidden_layers))
    for layer, probs in probe.probs.items():
        out, values = outputs[layer]
        assert probs.shape == (2, heads, length, length) and torch.equal(probe.values[layer], values)
        assert torch.allclose(probs.sum(-1), torch.ones(2, heads, length))
        assert probs.triu(diagonal=1).abs().max() == 0  # causal
        for head in range(heads):
            kv = head // (heads // kv_heads)
            torch.testing.assert_close(probs[:, head] @ values[:, kv], out[:, :, head], rtol=1e-4, atol=1e-5)


def test_a_resumed_run_takes_changed_options_from_its_step_on(tmp_path: Path) -> None:
    train(tmp_path, steps=2, options=TINY, log_every=2)
    before = torch.load(tmp_path / STATE_FILE, weights_only=False)["model"]
    trainer = open_trainer(tmp_path, TrainOptions(), changes={"box_weight": 0.5, "lr": 1e-4})
    assert trainer.step == 2 and trainer.dense is not None
    assert trainer.options == dataclasses.replace(TINY, box_weight=0.5, lr=1e-4)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer = train(tmp_path, steps=3, options=TrainOptions(), log_every=1,
                    changes={"box_weight": 0.5, "lookup_weight": 1.0, "value_weight": 1.0, "lookup_slots": True,
                             "match_weight": 0.5})
    assert trainer.options.box_weight == 0.5 and trainer.options.lookup_weight == 1.0 and trainer.step == 3
    log = (tmp_path / LOG_FILE).read_text().splitlines()
    assert log[1] == ('{"step": 2, "changed": {"box_weight": 0.5, "lookup_weight": 1.0, "value_weight": 1.0, '
                      '"lookup_slots": true, "match_weight": 0.5}}')
    assert all(f'"{metric}"' in log[2] for metric in ("box_mae", "lookup_mass", "value_mae", "match_query_acc"))
    # the readout it turned on is saved with the state and resumed with it
    resumed = open_trainer(tmp_path, TrainOptions())
    assert torch.equal(resumed.dense["box"].weight, trainer.dense["box"].weight)
    assert sorted(resumed.value) == ["0", "1"]  # the tiny preset has two layers, both probed
    assert all(torch.equal(resumed.value[k].weight, trainer.value[k].weight) for k in resumed.value)
    assert all(torch.equal(resumed.match[k].weight, trainer.match[k].weight) for k in resumed.match)


def test_shapes_tokenizer_spells_each_category_in_two_whole_words(tmp_path: Path) -> None:
    tokenizer = shapes_tokenizer(tmp_path)
    for category in CATEGORIES:
        ids = tokenizer.encode_text(category)
        assert len(ids) == 2 and tokenizer.decode(ids) == category, (category, ids)
        assert max(ids) < tokenizer.ids.coord_start  # ordinary text, not coordinate tokens
    colour, shape = CATEGORIES[0].split(" ")
    assert tokenizer.encode_text(category)[1] == tokenizer.encode_text(f"x {category.split(' ')[1]}")[1]
    assert len(tokenizer.encode_text(f"Detect {colour} {shape}.")) == 4
