"""The experiment config's model section is a typed CalicoConfig and its recipe section the loss and trainable
patterns: every ablation, the loss and the pre-processing are dotted overrides that reach training (focal loss, CEM
off); the pre-processing is stored with the run and a checkpoint, and a caller asking for other sizes gets an error
naming the fields. The old paths of the loss and trainable patterns (``model.loss``, ``model.trainable``) are
errors naming the new ones, and configs written with them (model config, experiment config, a workdir's
checkpoint meta) still load."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from calico_jax import models
from calico_jax.checkpoints.workdir import restore_workdir
from calico_jax.core.config import ConfigError
from calico_jax.core.preprocess import Preprocess
from calico_jax.models.calico import CalicoConfig
from calico_jax.train import config as config_lib
from calico_jax.train.loop import train
from calico_jax.train.losses import LossConfig
from calico_jax.train.trainer import check_base_preprocess

STEPS = [("total_steps", "3"), ("checkpoint_every", "100"), ("progress", "false"), ("batch_size", "2"),
         ("data.synthetic.num_images", "8"), ("data.synthetic_heldout.num_images", "2"),
         ("mesh", '{"data": 1, "fsdp": 1, "tensor": 1}'), ("num_devices", "1")]


def three_steps(workdir, *extra):
    cfg = config_lib.load("configs/tiny.py", [*STEPS, *extra])
    out = train(cfg, workdir)
    return cfg, [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()], out


@pytest.fixture(scope="module")
def bce(tmp_path_factory):
    return three_steps(tmp_path_factory.mktemp("bce"))


def test_overrides_are_typed_and_validated():
    cfg = config_lib.load("configs/calico_7b.py", [("model.cem.enabled", "false"), ("model.cam.layers", "[]"),
                                                   ("recipe.loss.pixel_loss", "focal"),
                                                   ("model.preprocess.blip_size", "364")])
    assert isinstance(cfg.model, CalicoConfig) and cfg.model.cem.enabled is False and cfg.model.cam.layers == ()
    assert cfg.recipe.loss.pixel_loss == "focal" and cfg.model.preprocess.blip_size == 364
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    lora = config_lib.load("configs/calico_7b.py", [("model.llm.lora.r", "16"),
                                                    ("model.llm.lora.target_modules", "q_proj,k_proj")]).model.llm.lora
    assert (lora.r, lora.target_modules) == (16, ("q_proj", "k_proj"))   # an optional section, field by field
    for key, val, msg in (("recipe.loss.pixel_loss", "dice", "bce' or 'focal"),
                          ("model.seg.hidden_position", "middle", "hidden_position"),
                          ("model.preprocess.sam_size", "512", "sam.image_encoder.img_size"),
                          ("model.cem.enabled", "maybe", "cannot parse"),
                          ("model.options", "{}", "no field 'options'"),
                          ("mesh.fsdp", "two", "cannot parse 'two' as JSON")):
        with pytest.raises(ConfigError, match=msg):
            config_lib.load("configs/calico_7b.py", [(key, val)])


def test_focal_loss_from_the_command_line_reaches_training(bce, tmp_path):
    ref, (cfg, (focal, *_), _) = bce[1][0], three_steps(tmp_path, ("recipe.loss.pixel_loss", "focal"))
    assert json.loads((tmp_path / "config.json").read_text())["recipe"]["loss"]["pixel_loss"] == "focal"
    # Same params and batch at step 1: the token loss is the same, the pixel term is the focal one (smaller than
    # BCE on the same logits: it down-weights every pixel by (1 - p_t)^2 and by alpha).
    assert focal["ce_loss"] == ref["ce_loss"] and focal["mask_dice_loss"] == ref["mask_dice_loss"]
    assert 0 < focal["mask_bce_loss"] < ref["mask_bce_loss"]
    w = cfg.recipe.loss
    assert focal["loss"] == pytest.approx(w.ce_weight * focal["ce_loss"] + w.pixel_weight * focal["mask_bce_loss"]
                                          + w.dice_weight * focal["mask_dice_loss"], rel=1e-5)


def test_cem_ablation_trains_without_cem_and_dinov2(bce, tmp_path):
    _, ref, ref_out = bce
    _, rows, out = three_steps(tmp_path, ("model.cem.enabled", "false"))
    # The CEM's output projection starts at zero (X'_global = X_global) and reaches the loss only through the
    # CAMs, whose reintegration layer also starts at zero: the CEM gets its first non-zero gradient at step 2,
    # so steps 1-2 are the same model and the runs part at step 3.
    assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in ref[:2]]
    assert np.isfinite(rows[2]["loss"]) and rows[2]["loss"] != ref[2]["loss"]
    trainable = set(out["state"]["params"])
    assert "cem" not in trainable and "cem" in ref_out["state"]["params"]
    assert {k for k in trainable if k.startswith("cam_")}        # the CAMs still train
    assert "dinov2" not in out["frozen"] and "dinov2" in ref_out["frozen"]


def test_preprocess_is_stored_and_mismatches_are_errors(bce, tmp_path):
    cfg, _, out = bce
    stored = out["trainer"].task.model_config.preprocess
    assert stored == cfg.model.preprocess == Preprocess(blip_size=28, dinov2_size=42, dinov2_crop=42, sam_size=32,
                                                         mask_size=40)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"config": {"preprocess": stored.replace(blip_size=224).to_dict()}}))
    with pytest.raises(ConfigError, match=r"blip_size: checkpoint 224, requested 28"):
        check_base_preprocess(cfg.model, str(base))
    with pytest.raises(ConfigError, match=r"dinov2_crop: checkpoint 42, requested 40.*sam_size"):
        stored.check_same(stored.replace(dinov2_crop=40, sam_size=64), "ckpt")
    stored.check_same(Preprocess.from_dict(json.loads(json.dumps(stored.to_dict()))), "ckpt")   # equal: no error


def test_old_paths_of_the_recipe_are_errors_naming_the_new_ones():
    for key, val, new in (("model.loss.pixel_loss", "focal", "--config.recipe.loss.pixel_loss"),
                          ("model.loss", "{}", "--config.recipe.loss"),
                          ("model.trainable", ".*", "--config.recipe.trainable"),
                          ("model", '{"trainable": [".*"]}', "--config.recipe.trainable")):
        with pytest.raises(ConfigError, match=f"moved to {new}( |$)") as e:
            config_lib.load("configs/tiny.py", [(key, val)])
        assert "\n" not in str(e.value)
    cfg = config_lib.load("configs/tiny.py", [("recipe.trainable", "llm/.*/lora_(a|b)")])
    assert cfg.recipe.trainable == (r"llm/.*/lora_(a|b)",) and cfg.recipe.active_trainable(cfg.model) == (
        r"llm/.*/lora_(a|b)",)


OLD_LOSS, OLD_TRAINABLE = {**LossConfig().to_dict(), "pixel_loss": "focal"}, [r"llm/.*/lora_(a|b)"]


def old_style(cfg):
    """``cfg`` as a config.json written before the recipe moved: ``loss`` and ``trainable`` in the model section."""
    model = {**cfg.model.to_dict(), "loss": OLD_LOSS, "trainable": OLD_TRAINABLE}
    return json.loads(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "recipe"} | {"model": model}))


def test_configs_written_before_the_recipe_moved_still_load(tmp_path):
    """Model configs (converted / exported checkpoints, checkpoint meta) drop ``loss`` and ``trainable``;
    experiment configs (a workdir's config.json) load them as the recipe."""
    cfg = config_lib.load("configs/tiny.py")
    old = old_style(cfg)
    assert CalicoConfig.from_dict(old["model"]) == cfg.model
    (tmp_path / "config.json").write_text(json.dumps({"format": "calico_jax", "model": "calico",
                                                      "config": old["model"]}))
    assert models.build("calico", json.loads((tmp_path / "config.json").read_text())["config"])[1] == cfg.model
    loaded = type(cfg).from_dict(old)
    assert loaded.model == cfg.model and loaded.recipe.loss.pixel_loss == "focal"
    assert loaded.recipe.trainable == tuple(OLD_TRAINABLE)
    assert loaded.replace(recipe=cfg.recipe) == cfg


def test_workdir_written_before_the_recipe_moved_restores(bce, tmp_path):
    """A training workdir from before the move (loss and trainable in its config.json's and its checkpoint meta's
    model config) restores the same model, with the trainable patterns its checkpoint meta recorded."""
    cfg, _, out = bce
    bce_workdir = Path(out["trainer"].task.workdir)
    workdir = tmp_path / "old_run"
    shutil.copytree(bce_workdir, workdir)
    (workdir / "config.json").write_text(json.dumps(old_style(cfg)))
    new = restore_workdir(bce_workdir)
    metas = sorted(workdir.glob("checkpoints/*/meta/metadata"))
    assert metas
    for meta_file in metas:
        meta = json.loads(meta_file.read_text())
        assert meta["model"]["trainable"] == list(cfg.recipe.active_trainable(cfg.model))
        meta["model"]["config"] = {**meta["model"]["config"], "loss": OLD_LOSS, "trainable": OLD_TRAINABLE}
        meta_file.write_text(json.dumps(meta))
    run = restore_workdir(workdir)
    assert run.config == new.config and run.step == new.step
    assert jax.tree.structure(run.params) == jax.tree.structure(new.params)
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
