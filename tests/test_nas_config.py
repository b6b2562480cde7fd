"""NASEA inputs: scen.yaml exactly as the reference writes it, one-paragraph errors with the
key and its line, the user_module.py contract, and the search space's rules."""
import textwrap

import pytest

from dopt.errors import DoptError
from dopt.nas.config import load_scen
from dopt.nas.space import SearchSpace
from dopt.nas.usermodule import check_user_module, load_user_module

# The reference's own example (its chapter "搜索参数配置"), byte for byte apart from the
# dataset folders: the full-width colon after pre_train_dir, the tuple input_shape, the
# trailing blanks, and `resource:` indented under `strategy:` as printed.
REFERENCE = """\
## Network architecture search scenario
scenario:
  strategy:
    name:                NASEA
    framework:           Tensorflow
    batch_size:          128
    epochs:              60
    constraint:
      application_type:  "image_classification"
      constraint_type:   "size"
      constraint_value:  11000000
    supernet:
      input_shape:       (224, 224, 3) 
      data_format:       "channels_last" 
      filters:           [64, 64, 128, 128, 256, 256] 
      strides:           [1, 1, 2, 1, 2, 1] 
      feature_choose:    [4, 5]
    optimizer:
      weights_optimizer:
        type:            "Adam"
        betas:           [0.9, 0.999]
        learning_rate:   0.0001
    dataset:
      pre_train_dir\uff1a   "tfrecords"
      train_dir:        "ImageNet_tf/"
      val_dir:          "ImageNet_tf/"
    searcher:
      generation_num:    100
      pop_size:          40
    resource:
      name:              Tensorflow_standalone
      gpu_id:            0,1,2,3,4,5,6,7
"""

TORCH = """\
scenario:
  strategy:
    name: NASEA
    framework: PyTorch
    batch_size: 32
    epochs: 1
    constraint:
      application_type: image_classification
      constraint_type: size
      constraint_value: 20000
    supernet:
      input_shape: (1, 28, 28)
      filters: [16, 32, 32]
      strides: [2, 2, 1]
    dataset:
      train_dir: data
      val_dir: data
    searcher:
      generation_num: 2
      pop_size: 4
  resource:
    name: pytorch_standalone
    gpu_id: 0
"""


@pytest.fixture
def folder(tmp_path, monkeypatch):
    for d in ("tfrecords", "ImageNet_tf", "data"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(folder, text, name="scen.yaml"):
    p = folder / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_reference_example_parses(folder):
    c = load_scen(_write(folder, REFERENCE))
    assert c.framework == "tensorflow" and c.batch_size == 128 and c.epochs == 60
    assert c.constraint_type == "size" and c.constraint_value == 11_000_000
    assert c.input_shape == (224, 224, 3) and c.input_chw == (3, 224, 224)
    assert c.filters == [64, 64, 128, 128, 256, 256] and c.strides == [1, 1, 2, 1, 2, 1]
    assert c.feature_choose == [4, 5]
    assert c.optimizer == {"type": "Adam", "learning_rate": 0.0001, "betas": [0.9, 0.999],
                           "momentum": 0.9}
    assert c.pre_train_dir == "tfrecords" and c.train_dir == "ImageNet_tf/"
    assert c.generation_num == 100 and c.pop_size == 40
    assert c.resource_name == "tensorflow_standalone" and c.gpu_ids == list(range(8))
    assert c.profile == "kirin9000" and c.processor_version == "npu_v1"
    assert c.lines["scenario.strategy.dataset.pre_train_dir"] == 24


def test_defaults_follow_the_reference_table(folder):
    c = load_scen(_write(folder, TORCH))
    assert c.data_format == "channels_first" and c.optimizer["type"] == "Adam"
    assert c.optimizer["learning_rate"] == 1e-4 and c.optimizer["betas"] == [0.9, 0.999]
    assert c.latency_precision == "int8" and c.pre_train_dir is None and c.gpu_ids == [0]


@pytest.mark.parametrize("old,new,key,line,words", [
    ("learning_rate:   0.0001", "learnig_rate:   0.0001",
     "weights_optimizer.learnig_rate", 22, "did you mean 'learning_rate'"),
    ("batch_size:          128", 'batch_size:          "128"', "batch_size", 6, "integer"),
    ('train_dir:        "ImageNet_tf/"', 'train_dir:        "missing/"', "train_dir", 25,
     "does not exist"),
    ("constraint_type:   \"size\"", "constraint_type:   \"params\"", "constraint_type", 10,
     "size, flops, latency"),
    ("strides:           [1, 1, 2, 1, 2, 1] ", "strides:           [1, 1, 2, 1, 2] ",
     "strides", 16, "one entry per searchable layer"),
    ("pop_size:          40", "pop_size:          1", "pop_size", 29, "at least 2"),
    ("application_type:  \"image_classification\"", "application_type:  \"object_detection\"",
     "application_type", 9, "not supported yet"),
    ("gpu_id:            0,1,2,3,4,5,6,7", "gpu_id:            zero", "gpu_id", 32,
     "comma-separated"),
])
def test_bad_values_name_the_key_and_line(folder, old, new, key, line, words):
    assert old in REFERENCE
    p = _write(folder, REFERENCE.replace(old, new))
    with pytest.raises(DoptError) as e:
        load_scen(p)
    msg = str(e.value)
    assert key in msg and f"line {line}" in msg and words in msg, msg
    assert "\n" not in msg
    assert sorted(x.name for x in folder.iterdir()) == ["ImageNet_tf", "data", "scen.yaml",
                                                        "tfrecords"]  # nothing written


def test_missing_required_key_and_bad_yaml(folder):
    with pytest.raises(DoptError, match=r"val_dir.*required"):
        load_scen(_write(folder, TORCH.replace("      val_dir: data\n", "")))
    with pytest.raises(DoptError, match=r"line 6.*not valid YAML.*from line 4"):
        load_scen(_write(folder, TORCH.replace("    framework: PyTorch", "    framework: [")))


def test_pytorch_refuses_channels_last_and_tf_segmentation(folder):
    with pytest.raises(DoptError, match="channels_first"):
        load_scen(_write(folder, TORCH.replace("      filters:", "      data_format: "
                                               "channels_last\n      filters:")))
    seg = REFERENCE.replace('"image_classification"', '"semantic_segmentation"')
    with pytest.raises(DoptError, match="PyTorch only"):
        load_scen(_write(folder, seg))


# --- user_module.py ---------------------------------------------------------------------------

GOOD_TORCH = """
class UserModule:
    def __init__(self, epoch, batch_size): pass
    def dataset_define(self, dataset_dir, is_training): pass
    def scheduler_define(self, optimizer, steps_per_epoch): pass
    def metrics_func(self, eval_dataloader, eval_function): pass
    def loss_func(self, labels, logits): pass
class PreNet:
    def __init__(self): pass
    def forward(self, inputs): pass
class PostNet:
    def __init__(self): pass
    def forward(self, inputs): pass
"""


def _mod(tmp_path, text):
    p = tmp_path / "user_module.py"
    p.write_text(textwrap.dedent(text))
    return p


def test_user_module_contract(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _mod(tmp_path, GOOD_TORCH)
    load_user_module("pytorch")
    _mod(tmp_path, GOOD_TORCH.replace("def loss_func", "def loss_fn"))
    with pytest.raises(DoptError, match=r"class UserModule has no method loss_func"):
        load_user_module("pytorch")
    _mod(tmp_path, GOOD_TORCH.replace("dataset_define(self, dataset_dir, is_training)",
                                      "dataset_define(self, dataset_dir)"))
    with pytest.raises(DoptError, match=r"UserModule.dataset_define cannot be called"):
        load_user_module("pytorch")
    _mod(tmp_path, GOOD_TORCH.replace("class PostNet", "class PostNetwork"))
    with pytest.raises(DoptError, match=r"no class PostNet"):
        load_user_module("pytorch")


def test_tensorflow_contract_allows_optional_is_shuffle(tmp_path):
    text = """
    class UserModule:
        def __init__(self, epoch, batch_size): pass
        def build_dataset_search(self, dataset_dir, is_training, is_shuffle=True): pass
        def lr_scheduler(self, lr_init, global_step): pass
        def metrics_op(self, inputs, outputs): pass
        def loss_op(self, labels, logits): pass
    class PreNet:
        def __init__(self): pass
        def call(self, inputs, training=True): pass
    class PostNet:
        def __init__(self): pass
        def call(self, inputs): pass
    """
    import types
    ns = types.ModuleType("um")
    exec(textwrap.dedent(text), ns.__dict__)
    check_user_module(ns, "tensorflow")
    ns.PostNet.call = lambda self: None
    with pytest.raises(DoptError, match="PostNet.call"):
        check_user_module(ns, "tensorflow")


def test_missing_user_module_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DoptError, match="user_module.py was not found in the current folder"):
        load_user_module("pytorch")


# --- search space -----------------------------------------------------------------------------


def test_space_widths_aligned_last_layer_exact_identity_rules():
    s = SearchSpace([16, 24, 24, 32, 32, 128], [1, 2, 1, 2, 1, 1], in_channels=16, align=16,
                    fixed=[3])
    for lay in s.layers[:-1]:
        if lay.index != 3:
            assert all(w % 16 == 0 for w in lay.widths)
    assert s.layers[-1].widths == (128,) and s.layers[3].widths == (32,)
    assert "identity" not in s.layers[1].blocks          # stride 2
    assert "identity" not in s.layers[-1].blocks         # keeps filters exactly
    assert "identity" not in s.layers[3].blocks          # read by PostNet (feature_choose)
    assert "identity" in s.layers[2].blocks
    arch = s.decode([("conv3x3", 16), ("ir_k3_e6", 32), ("identity", 16), ("dwsep", 32),
                     ("basic", 32), ("bottleneck", 128)])
    assert arch[2] == ("identity", 32, 32, 1)            # identity keeps its input width
    assert s.parse_key(s.key(arch)) == arch
    assert s.from_params(s.to_params(arch)) == arch
    assert s.cap_in[3] == max(s.layers[2].widths + s.layers[1].widths)
    with pytest.raises(ValueError):
        s.decode([("conv3x3", 20)] + [("conv3x3", 32)] * 5)
