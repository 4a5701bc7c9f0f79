import dataclasses

import pytest

from dimaskdino.config import (
    PRESETS,
    Config,
    DataConfig,
    LossConfig,
    TrainConfig,
    apply_overrides,
    get_preset,
)


def test_every_preset_builds_and_validates():
    for name in PRESETS:
        cfg = get_preset(name)
        assert isinstance(cfg, Config)
        assert cfg.impl == "auto"


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(KeyError, match="dimaskdino_r50_12ep"):
        get_preset("nope")


def test_fields_others_rely_on():
    cfg = get_preset("dimaskdino_r50_12ep")
    assert cfg.model.num_classes == 80 and cfg.model.hidden_dim == 256 and cfg.model.num_queries == 300
    assert cfg.model.backbone.weights == ""
    assert cfg.loss == LossConfig(
        class_weight=4.0, l1_weight=5.0, giou_weight=2.0, mask_bce_weight=5.0, dice_weight=5.0,
        num_points=12544, oversample_ratio=3.0, importance_sample_ratio=0.75, focal_alpha=0.25,
        focal_gamma=2.0, cost_class=4.0, cost_bbox=5.0, cost_giou=2.0, cost_mask=5.0, cost_dice=5.0,
    )
    train = cfg.train
    assert isinstance(train, TrainConfig)
    assert (train.lr, train.weight_decay, train.backbone_lr_mult, train.clip_grad_norm) == (1e-4, 0.05, 0.1, 0.01)
    assert (train.batch_size, train.epochs, train.warmup_iters) == (16, 12, 0)  # the authors: no warmup
    assert cfg.data == DataConfig(image_size=1024, min_scale=0.1, max_scale=2.0, test_short_side=800, test_max_size=1333)


def test_schedules_follow_spec_iterations():
    # 88,500 iterations = 12 epochs at batch 16: steps at 81,125 / 147,500 / 327,778 and 355,092.
    iters_per_epoch = 88_500 / 12
    assert get_preset("dimaskdino_r50_12ep").train.lr_drop_epochs == pytest.approx((11.0,))
    cfg24 = get_preset("dimaskdino_r50_24ep").train
    assert cfg24.epochs == 24 and cfg24.lr_drop_epochs == pytest.approx((20.0,))
    cfg50 = get_preset("dimaskdino_r50_50ep").train
    assert cfg50.epochs == 50
    assert [e * iters_per_epoch for e in cfg50.lr_drop_epochs] == pytest.approx([327_778, 355_092])
    assert get_preset("maskdino_r50_50ep").train.lr_drop_epochs == cfg50.lr_drop_epochs
    assert get_preset("maskdino_r50_12ep").train.epochs == 12


def test_maskdino_presets_turn_di_off():
    for name in ("maskdino_r50_12ep", "maskdino_r50_50ep"):
        model = get_preset(name).model
        assert model.decoder.num_layers == 9
        assert not model.di.enabled and not model.bato.enabled
        assert model.num_queries == 300 and model.denoising.enabled
    model = get_preset("dimaskdino_r50_12ep").model
    assert model.decoder.num_layers == 6 and model.di.enabled and model.bato.enabled
    assert model.di.num_first_selection == 600 and model.di.num_ti_layers == 2
    assert model.bato.num_guiding_tokens == 50


def test_demo_is_small_but_complete():
    model = get_preset("demo").model
    assert model.backbone.depth == 18 and model.hidden_dim < 256
    assert model.di.enabled and model.bato.enabled and model.denoising.enabled


def test_presets_are_independent_copies():
    a = get_preset("dimaskdino_r50_12ep")
    a.model.hidden_dim = 32
    a.train.lr_drop_epochs = (1.0,)
    assert get_preset("dimaskdino_r50_12ep").model.hidden_dim == 256
    assert get_preset("dimaskdino_r50_24ep").model.hidden_dim == 256


def test_overrides_are_typed():
    base = get_preset("dimaskdino_r50_12ep")
    cfg = apply_overrides(
        base,
        [
            "model.hidden_dim=128",
            "train.lr=2e-4",
            "model.di.enabled=false",
            "model.bato.enabled=False",
            "model.denoising.enabled=0",
            "train.lr_drop_epochs=(8, 10.5)",
            "model.backbone.weights=/tmp/r50.pth",
            "impl=ref",
            "train.epochs=1e1",
            "model.pixel_mean=[1,2,3]",
        ],
    )
    assert cfg.model.hidden_dim == 128 and isinstance(cfg.model.hidden_dim, int)
    assert cfg.train.lr == 2e-4
    assert cfg.model.di.enabled is False and cfg.model.bato.enabled is False and cfg.model.denoising.enabled is False
    assert cfg.train.lr_drop_epochs == (8.0, 10.5)
    assert cfg.model.backbone.weights == "/tmp/r50.pth"
    assert cfg.impl == "ref"
    assert cfg.train.epochs == 10
    assert cfg.model.pixel_mean == (1.0, 2.0, 3.0)
    # The input is untouched.
    assert base.model.hidden_dim == 256 and base.model.di.enabled


def test_override_booleans_and_single_tuple():
    cfg = apply_overrides(get_preset("demo"), ["model.di.enabled=yes", "train.lr_drop_epochs=7"])
    assert cfg.model.di.enabled is True and cfg.train.lr_drop_epochs == (7.0,)
    cfg = apply_overrides(get_preset("demo"), ['model.backbone.weights=""'])
    assert cfg.model.backbone.weights == ""


def test_unknown_key_names_key_and_lists_section():
    with pytest.raises(KeyError) as info:
        apply_overrides(get_preset("demo"), ["model.hiden_dim=3"])
    message = str(info.value)
    assert "model.hiden_dim" in message and "hidden_dim" in message and "num_queries" in message
    with pytest.raises(KeyError, match="lr"):
        apply_overrides(get_preset("demo"), ["train.learning_rate=1"])
    with pytest.raises(KeyError, match="model"):
        apply_overrides(get_preset("demo"), ["modle.hidden_dim=3"])


def test_wrong_types_are_clear():
    with pytest.raises(ValueError, match="model.hidden_dim.*int.*abc"):
        apply_overrides(get_preset("demo"), ["model.hidden_dim=abc"])
    with pytest.raises(ValueError, match="model.hidden_dim.*int"):
        apply_overrides(get_preset("demo"), ["model.hidden_dim=1.5"])
    with pytest.raises(ValueError, match="boolean"):
        apply_overrides(get_preset("demo"), ["model.di.enabled=maybe"])
    with pytest.raises(ValueError, match="train.lr.*float"):
        apply_overrides(get_preset("demo"), ["train.lr=fast"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(get_preset("demo"), ["train.lr"])


def test_sections_and_values_are_not_confused():
    with pytest.raises(KeyError, match="section"):
        apply_overrides(get_preset("demo"), ["model.di=1"])
    with pytest.raises(KeyError, match="value"):
        apply_overrides(get_preset("demo"), ["train.lr.x=1"])


def test_validation_after_overrides():
    with pytest.raises(ValueError, match="hidden_dim"):
        apply_overrides(get_preset("demo"), ["model.hidden_dim=100"])
    with pytest.raises(ValueError, match="depth"):
        apply_overrides(get_preset("demo"), ["model.backbone.depth=101"])
    with pytest.raises(ValueError, match="num_first_selection"):
        apply_overrides(get_preset("dimaskdino_r50_12ep"), ["model.di.num_first_selection=200"])
    with pytest.raises(ValueError, match="pixel_mean"):
        apply_overrides(get_preset("demo"), ["model.pixel_mean=(1,2)"])
    # DI off lifts the k1 >= k2 constraint.
    apply_overrides(get_preset("dimaskdino_r50_12ep"), ["model.di.enabled=false", "model.di.num_first_selection=200"])


def test_every_field_can_be_overridden_with_its_own_value():
    """Round trip: every leaf field, written back as text, parses to the same value."""
    cfg = get_preset("dimaskdino_r50_50ep")

    def leaves(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                yield from leaves(value, key + ".")
            else:
                yield key, value

    items = list(leaves(cfg, ""))
    overrides = []
    for key, value in items:
        text = "(" + ",".join(repr(v) for v in value) + ")" if isinstance(value, tuple) else str(value)
        overrides.append(f"{key}={text}")
    assert apply_overrides(cfg, overrides) == cfg


def test_every_numeric_train_field_is_validated():
    """Each int/float train field has a bound (log_period=0 once crashed with ZeroDivisionError
    after the first step); the error names the key."""
    import typing

    from dimaskdino.config import _TRAIN_BOUNDS, TrainConfig

    numeric = {name for name, kind in typing.get_type_hints(TrainConfig).items() if kind in (int, float)}
    assert numeric <= set(_TRAIN_BOUNDS), numeric - set(_TRAIN_BOUNDS)
    cfg = get_preset("demo")
    for key, bad in [("log_period", "0"), ("lr", "0"), ("lr", "-1e-4"), ("batch_size", "0"), ("clip_grad_norm", "0"),
                     ("max_bad_steps", "0"), ("epochs", "0"), ("eval_batch_size", "0"), ("warmup_iters", "-1"),
                     ("keep_checkpoints", "-1"), ("lr", "nan"), ("weight_decay", "inf"), ("lr_drop_epochs", "(-1)")]:
        with pytest.raises(ValueError, match=f"train.{key} must be"):
            apply_overrides(cfg, [f"train.{key}={bad}"])
    with pytest.raises(ValueError, match="loss.dice_weight must be finite"):
        apply_overrides(cfg, ["loss.dice_weight=nan"])


def test_unknown_key_suggests_the_closest():
    with pytest.raises(KeyError, match=r"did you mean 'train.log_period'\?"):
        apply_overrides(get_preset("demo"), ["train.log_perod=5"])
    with pytest.raises(KeyError, match=r"did you mean 'model.di.num_first_selection'\?"):
        apply_overrides(get_preset("demo"), ["model.di.num_first_selektion=5"])
    with pytest.raises(KeyError) as error:
        apply_overrides(get_preset("demo"), ["train.zzzz=5"])
    assert "did you mean" not in str(error.value)


def test_validation_error_is_one_line():
    with pytest.raises(ValueError) as error:
        apply_overrides(get_preset("demo"), ["train.log_period=0", "model.hidden_dim=33"])
    assert "\n" not in str(error.value) and "train.log_period" in str(error.value) and "model.hidden_dim" in str(error.value)
