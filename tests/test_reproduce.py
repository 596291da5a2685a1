"""The CIFAR-100 / ImageNet benchmark configs and `kd-jax reproduce` on their tiny flavour."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags
import pytest

from kd_jax import cli, configs, models, objective, phase, reproduce
from kd_jax.experiments import cifar100_crd, cifar100_kd, imagenet_kd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Methods whose objective is evaluated on the models' tap shapes here (vid and crd are
# checked for their taps only: they are being added to kd_jax.objective).
EVALUATED = ("kd", "dkd", "fitnet", "attention_transfer", "similarity_preserving",
             "correlation_congruence", "rkd", "pkt", "nst")


@functools.cache
def _tap_shapes(model_name: str, image_shape=(32, 32, 3), num_classes=100) -> dict:
  """Every tap of a model on a batch of two images."""
  model = models.create(model_name, num_classes)
  return jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((2, *image_shape)), train=False)[0][1])


def _check_terms(config, image_shape, num_classes):
  """The terms' taps exist on both models; the objective builds, resolves, evaluates."""
  t_taps = _tap_shapes(config.teacher.name, image_shape, num_classes)
  s_taps = _tap_shapes(config.student.name, image_shape, num_classes)
  terms = config.distill.to_dict()["terms"]
  for term in terms:
    if objective.METHODS.get(term["method"]).inputs != objective.LOGITS:
      names = lambda taps: (taps,) if isinstance(taps, str) else tuple(taps)
      for tap in names(term["student_tap"]):  # a multi-tap term names several
        assert tap in s_taps, (config.student.name, term)
      for tap in names(term.get("teacher_tap") or term["student_tap"]):
        assert tap in t_taps, (config.teacher.name, term)
  if not all(t["method"] in objective.METHODS for t in terms):
    return
  built = objective.build(config.distill, total_steps=10, steps_per_epoch=1,
                          num_train=50_000)
  built = objective.resolve(built, s_taps, t_taps, config.student.name,
                            config.teacher.name)
  if not all(t["method"] in EVALUATED for t in terms):
    return

  def total(logits, s_taps, t_taps, labels):
    variables = built.init(jax.random.key(0), logits, s_taps, logits, t_taps, labels,
                           None)
    return built(jnp.zeros((), jnp.int32), variables, logits, s_taps, logits, t_taps,
                 labels)[0]

  logits = jax.ShapeDtypeStruct((2, num_classes), jnp.float32)
  labels = jax.ShapeDtypeStruct((2,), jnp.int32)
  assert jax.eval_shape(total, logits, s_taps, t_taps, labels).shape == ()


@pytest.mark.parametrize("pair", list(cifar100_crd.PAIRS))
def test_every_variant_is_valid_and_its_terms_fit_both_models(pair):
  spec = cifar100_crd.PAIRS[pair]
  for method in cifar100_crd.METHODS:
    if cifar100_crd.unavailable(spec, method):  # AB and FSP across architectures
      assert spec.cross_architecture and method in ("activation_boundary", "fsp")
      with pytest.raises(ValueError, match="pick a same-architecture pair"):
        cifar100_crd.get_config(f"{pair}:{method}")
      continue
    config = cifar100_crd.get_config(f"{pair}:{method}")
    configs.validate(config)
    assert (config.teacher.name, config.student.name) == (spec.teacher, spec.student)
    assert config.train_vanilla is False
    assert config.train.epochs == 240 and config.train.batch_size == 64
    assert config.train.learning_rate == (
        0.01 if spec.student in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05)
    terms = config.distill.to_dict()["terms"]
    method_of_terms = {"vanilla": set(), "dot": {"kd"}}.get(method, {method})  # dot: KD
    assert {t["method"] for t in terms} == method_of_terms
    _check_terms(config, (32, 32, 3), 100)
    tiny = cifar100_crd.get_config(f"{pair}:{method}:tiny")
    configs.validate(tiny)
    assert tiny.data.name == "kd_digits" and tiny.train.epochs == 1
    shrunk = config.distill.to_dict()  # the one difference: FT's pre-training epochs
    for term in shrunk["terms"]:
      if term["method"] == "factor_transfer":
        term["pretrain"] = dict(term.get("pretrain") or {}, epochs=1.0)
    assert tiny.distill.to_dict() == shrunk
    _check_terms(tiny, (8, 8, 1), 10)


def _terms(variant: str) -> list[dict]:
  return cifar100_crd.get_config(variant).distill.to_dict()["terms"]


def test_the_recipes_match_the_papers():
  kd = cifar100_crd.get_config("resnet32x4-resnet8x4:kd")
  assert kd.distill.ce_weight == 0.1
  assert _terms("resnet32x4-resnet8x4:kd") == [dict(method="kd", weight=0.9,
                                                    temperature=4.0)]
  assert tuple(kd.train.decay_epochs) == (150, 180, 210) and kd.train.weight_decay == 5e-4
  weights = {m: [t["weight"] for t in _terms(f"vgg13-vgg8:{m}")]
             for m in cifar100_crd.METHODS}
  assert weights == {"vanilla": [], "kd": [0.9], "fitnet": [100.0],
                     "attention_transfer": [1000.0] * 4, "similarity_preserving": [3000.0],
                     "correlation_congruence": [0.02], "vid": [1.0] * 4, "rkd": [1.0],
                     "pkt": [30000.0], "nst": [50.0] * 4, "crd": [0.8], "dkd": [1.0],
                     # the authors' CIFAR-100 weights of the later methods
                     "dist": [2.0], "ctkd": [0.9], "wkd": [1.0], "mlkd": [0.9],
                     "dot": [0.9], "activation_boundary": [1.0], "factor_transfer": [200.0],
                     "fsp": [1.0]}
  for pair, spec in cifar100_crd.PAIRS.items():
    methods = [m for m in cifar100_crd.METHODS if not cifar100_crd.unavailable(spec, m)]
    ce = {m: cifar100_crd.get_config(f"{pair}:{m}").distill.ce_weight for m in methods}
    assert ce == {m: 0.1 if m in ("kd", "ctkd", "mlkd", "dot") else 1.0 for m in methods}
  # FT: the last stage of each; the paraphraser's phase at RepDistiller's init lr.
  [ft] = _terms("resnet32x4-ShuffleV1:factor_transfer")
  assert (ft["student_tap"], ft["teacher_tap"], ft.get("pretrain")) == (
      "stage_3", "stage_3", None)
  assert _terms("vgg13-vgg8:factor_transfer")[0]["student_tap"] == "stage_4"
  assert _terms("resnet56-resnet20:factor_transfer")[0]["pretrain"] == dict(
      learning_rate=0.01)
  assert _terms("vgg13-vgg8:fsp")[0]["student_tap"] == (
      "stem", "stage_1", "stage_2", "stage_3", "stage_4")
  assert _terms("resnet32x4-resnet8x4:wkd")[0]["gamma"] == 600.0
  assert cifar100_crd.get_config("resnet32x4-resnet8x4:dist").published.method == 76.31
  assert cifar100_crd.get_config("resnet32x4-resnet8x4:ctkd").published.method is None
  assert cifar100_crd.get_config("resnet32x4-resnet8x4:dot").train.optimizer == "dot"
  [fitnet] = _terms("resnet56-resnet20:fitnet")
  assert (fitnet["student_tap"], fitnet["teacher_tap"], fitnet["adapter"]) == (
      "stage_2", "stage_2", "conv1x1")
  assert [t["student_tap"] for t in _terms("wrn_40_2-wrn_16_2:similarity_preserving")] == [
      "stage_3"]
  assert [t["student_tap"] for t in _terms("resnet110-resnet32:nst")] == [
      "stage_1", "stage_2", "stage_3"]
  betas = {p: _terms(f"{p}:dkd")[0]["beta"] for p in cifar100_crd.PAIRS}
  assert betas == {"resnet56-resnet20": 2.0, "resnet110-resnet32": 2.0,
                   "resnet32x4-resnet8x4": 8.0, "wrn_40_2-wrn_16_2": 6.0,
                   "vgg13-vgg8": 6.0, "vgg13-MobileNetV2": 6.0,
                   "resnet32x4-ShuffleV1": 8.0, "resnet32x4-ShuffleV2": 8.0}
  assert _terms("vgg13-vgg8:dkd") == [dict(
      method="dkd", weight=1.0, alpha=1.0, beta=6.0, temperature=4.0,
      schedule="linear_warmup", warmup_epochs=20)]
  # cifar100_kd.py is the KD variant, with the vanilla student trained alongside.
  wrapped = cifar100_kd.get_config()
  assert wrapped.train_vanilla is True
  wrapped.train_vanilla = False
  assert wrapped.to_dict() == kd.to_dict()


def test_published_numbers_are_recorded_for_every_variant():
  for pair, spec in cifar100_crd.PAIRS.items():
    for method in cifar100_crd.METHODS:
      if cifar100_crd.unavailable(spec, method):
        continue
      p = cifar100_crd.get_config(f"{pair}:{method}").published
      assert 50 < p.student < p.teacher < 80, (pair, method)
      # The later methods' authors report some pairs only.
      assert (p.method is None and method in cifar100_crd.RECENT) or 50 < p.method < 80, (
          pair, method)
      assert ("Decoupled" in p.source) == (method == "dkd")
      if method == "vanilla":
        assert p.method == p.student
  by_method = {m: cifar100_crd.get_config(f"resnet32x4-resnet8x4:{m}").published.method
               for m in cifar100_crd.METHODS}
  assert by_method == {"vanilla": 72.50, "kd": 73.33, "fitnet": 73.50,
                       "attention_transfer": 73.44, "similarity_preserving": 72.94,
                       "correlation_congruence": 72.97, "vid": 73.09, "rkd": 71.90,
                       "pkt": 73.64, "nst": 73.30, "crd": 75.51, "dkd": 76.32,
                       "dist": 76.31, "ctkd": None, "wkd": 76.53, "mlkd": 77.08,
                       "dot": 75.12, "activation_boundary": 73.17, "factor_transfer": 72.86,
                       "fsp": 72.62}
  # CRD Table 2 (RepDistiller's README): AB and FT across architectures, FSP none.
  assert [cifar100_crd.get_config(f"{p}:{m}").published.method
          for p in ("vgg13-MobileNetV2", "resnet32x4-ShuffleV2")
          for m in ("activation_boundary", "factor_transfer")
          if not cifar100_crd.unavailable(cifar100_crd.PAIRS[p], m)] == [61.78, 72.50]
  assert cifar100_crd.PAIRS["resnet32x4-ShuffleV1"].method_top1[-3:] == (73.55, 71.75, None)
  p = cifar100_crd.get_config("vgg13-MobileNetV2:attention_transfer").published
  assert (p.teacher, p.student, p.method) == (74.64, 64.60, 59.40)
  assert {m: imagenet_kd.get_config(m).published.method for m in ("kd", "dkd")} == {
      "kd": 71.03, "dkd": 71.70}


def test_imagenet_variants():
  for variant in ("kd", "dkd", "teacher", "kd:tiny", "dkd:tiny"):
    config = imagenet_kd.get_config(variant)
    configs.validate(config)
    assert objective.build(config.distill, total_steps=10, steps_per_epoch=1)
  kd, dkd = imagenet_kd.get_config("kd"), imagenet_kd.get_config("dkd")
  assert (kd.teacher.name, kd.student.name, kd.data.name) == ("resnet34", "resnet18",
                                                               "imagenet2012")
  assert kd.teacher.checkpoint == dkd.teacher.checkpoint == imagenet_kd.TEACHER_CHECKPOINT
  assert imagenet_kd.get_config("teacher").teacher.checkpoint is None
  assert imagenet_kd.get_config("kd:tiny").teacher.checkpoint is None
  assert kd.distill.ce_weight == 0.5
  assert kd.distill.to_dict()["terms"] == [dict(method="kd", weight=0.5, temperature=1.0)]
  assert dkd.distill.ce_weight == 1.0
  assert dkd.distill.to_dict()["terms"] == [dict(
      method="dkd", weight=1.0, alpha=1.0, beta=0.5, temperature=1.0,
      schedule="linear_warmup", warmup_epochs=1)]
  with pytest.raises(ValueError, match="unknown variant 'crd'"):
    imagenet_kd.get_config("crd")


def test_the_variant_passes_through_the_config_flag_whole():
  argv = ["kd-jax", f"--config={ROOT}/kd_jax/experiments/cifar100_crd.py:wrn_40_2-wrn_16_2:nst:tiny"]
  fv = flags.FlagValues()
  flag = config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
  fv(argv)
  assert (flag.value.teacher.name, flag.value.student.name) == ("wrn_16_1", "wrn_16_1")
  assert flag.value.data.name == "kd_digits" and flag.value.train.epochs == 1
  assert {t["method"] for t in flag.value.distill.terms} == {"nst"}


def test_reproduce_tiny_writes_the_table_of_its_runs(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  rows = reproduce.run(["resnet56-resnet20"], ["kd", "attention_transfer"], workdir,
                       tiny=True)
  assert [(r["pair"], r["method"]) for r in rows] == [
      ("resnet56-resnet20", "kd"), ("resnet56-resnet20", "attention_transfer")]

  def summary(method):
    with open(os.path.join(workdir, "resnet56-resnet20", method, "summary.json")) as f:
      return json.load(f)

  vanilla = summary("vanilla")
  assert vanilla["student_accuracy"] is None  # the vanilla run's one student is CE-only
  assert os.path.isdir(os.path.join(workdir, "teachers", "resnet8", "teacher"))
  with open(os.path.join(workdir, "reproduce.json")) as f:
    written = json.load(f)
  assert written == {"tiny": True, "runs": rows}
  with open(os.path.join(workdir, "reproduce.md")) as f:
    table = f.read()
  for row in rows:
    s = summary(row["method"])
    assert row["measured"] == {"teacher": 100 * s["teacher_accuracy"],
                               "student": 100 * vanilla["distilled_accuracy"],
                               "method": 100 * s["distilled_accuracy"]}
    published = cifar100_crd.get_config(f"resnet56-resnet20:{row['method']}").published
    assert row["published"] == {k: published[k] for k in ("teacher", "student", "method")}
    for k in ("teacher", "student", "method"):
      assert row["difference"][k] == row["measured"][k] - row["published"][k]
    line = next(l for l in table.splitlines()
                if l.startswith(f"| resnet56-resnet20 | {row['method']} |"))
    assert row["best_by_validation"] == {"teacher": None, "student": None, "method": None}
    assert f"| {row['measured']['method']:.2f} | — | {row['published']['method']:.2f} | " \
           f"{row['difference']['method']:+.2f} |" in line
    assert not s["tflite"]  # export stays off unless asked
  # Rerunning reads the finished runs back instead of training again.
  def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(phase, "train_phase", no_training)
  assert reproduce.run(["resnet56-resnet20"], ["attention_transfer", "kd"], workdir,
                       tiny=True) == rows[::-1]


def test_an_unknown_method_or_pair_is_a_one_line_error(tmp_path, capsys):
  with pytest.raises(ValueError) as e:
    reproduce.run(["resnet56-resnet20"], ["kd", "hinton"], str(tmp_path / "w"))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("unknown method 'hinton'; known methods: vanilla, kd, fitnet,")
  with pytest.raises(ValueError, match="^unknown pair 'resnet8-resnet8'; known pairs: "
                     "resnet56-resnet20, "):
    reproduce.run("resnet56-resnet20,resnet8-resnet8", None, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # refused before any work

  with pytest.raises(SystemExit) as exit_:
    cli.main(["kd-jax", "reproduce", f"--workdir={tmp_path / 'w'}", "--methods=hinton"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("kd-jax: error: unknown method 'hinton'") and "\n" not in err


def test_seeds_give_mean_and_std_of_last_and_best(tmp_path, monkeypatch):
  # Each run's figures are a function of its seed and method, so the table's mean and
  # sample std over seeds can be written down by hand.
  accuracy = {("vanilla", 0): 0.70, ("vanilla", 1): 0.72, ("vanilla", 2): 0.74,
              ("kd", 0): 0.75, ("kd", 1): 0.76, ("kd", 2): 0.80}
  seen = []

  def fake_distill(config, run_dir):
    method = os.path.basename(run_dir).split("@")[0]
    seen.append((method, config.seed, config.teacher.checkpoint))
    last = accuracy[method, config.seed]
    return {"teacher_accuracy": 0.79, "distilled_accuracy": last,
            "phases": {"teacher": {"best": {"test_accuracy": 0.80}},
                       "distilled": {"best": {"test_accuracy": last + 0.01}}}}

  monkeypatch.setattr(reproduce, "_distill", fake_distill)
  monkeypatch.setattr(reproduce.experiment, "train_teacher", lambda config, workdir: None)
  [row] = reproduce.run(["resnet56-resnet20"], ["kd"], str(tmp_path), tiny=True, seeds=3)
  assert sorted((m, s) for m, s, _ in seen) == sorted(accuracy)
  assert len({t for _, _, t in seen}) == 1  # one teacher for every seed
  np.testing.assert_allclose(row["measured"]["method"], 77.0)
  np.testing.assert_allclose(row["std"]["method"], np.std([75, 76, 80], ddof=1))
  np.testing.assert_allclose(row["measured"]["student"], 72.0)
  np.testing.assert_allclose(row["std"]["student"], 2.0)
  np.testing.assert_allclose(row["best_by_validation"]["method"], 78.0)
  assert row["std"]["teacher"] is None and row["measured"]["teacher"] == 79.0
  table = open(tmp_path / "reproduce.md").read()
  assert "mean ± std over 3 seeds" in table and "| 77.00 ± 2.65 | 78.00 ± 2.65 |" in table
  with pytest.raises(ValueError, match="--seeds must be at least 1"):
    reproduce.run(["resnet56-resnet20"], ["kd"], str(tmp_path), seeds=0)
