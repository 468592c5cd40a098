"""The modeling layer: filter bank, RC blocks, NDDR fusion, heads, the multi-task network and its deploy form."""

from rcm_nddr.nn.accounting import owned_by, parameter_breakdown, task_state
from rcm_nddr.nn.adapters import RAResNet
from rcm_nddr.nn.assembly import TaskSpec, assemble, build_head, build_network, probe_input, probe_outputs
from rcm_nddr.nn.backbone import (
    STAGES,
    PerTaskBackbone,
    ResNetBackbone,
    SharedBackbone,
    TaskBackbones,
    once_per_input,
    plain_backbone,
    resnet_backbone,
)
from rcm_nddr.nn.batched import BatchedMultiTaskNet
from rcm_nddr.nn.cross_stitch import CrossStitchFusion
from rcm_nddr.nn.filter_bank import bank_weights, filter_bank_sha256, reparameterized_convs
from rcm_nddr.nn.heads import DeepLabV3Head, DeepLabV3PlusHead
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.nn.nddr import NDDRFusion, NDDRLayer, NDDRShortcut, transitive_sources
from rcm_nddr.nn.rc import RCBasicBlock, RCBlock, RCBottleneck, RCConv2d, RCResNet, TaskModules, rc_block
from rcm_nddr.nn.rc_vgg import RCVGG, rc_backbone
from rcm_nddr.nn.vgg import VGGBackbone

# ``deploy`` (the function) is imported from ``rcm_nddr.nn.deploy``: binding it here would hide the module.
__all__ = [
    "STAGES",
    "BatchedMultiTaskNet",
    "CrossStitchFusion",
    "DeepLabV3Head",
    "DeepLabV3PlusHead",
    "MultiTaskNet",
    "NDDRFusion",
    "NDDRLayer",
    "NDDRShortcut",
    "PerTaskBackbone",
    "RAResNet",
    "RCBasicBlock",
    "RCBlock",
    "RCBottleneck",
    "RCConv2d",
    "RCResNet",
    "RCVGG",
    "ResNetBackbone",
    "SharedBackbone",
    "TaskBackbones",
    "TaskModules",
    "TaskSpec",
    "VGGBackbone",
    "assemble",
    "bank_weights",
    "build_head",
    "build_network",
    "filter_bank_sha256",
    "once_per_input",
    "owned_by",
    "parameter_breakdown",
    "plain_backbone",
    "probe_input",
    "probe_outputs",
    "rc_backbone",
    "rc_block",
    "reparameterized_convs",
    "resnet_backbone",
    "task_state",
    "transitive_sources",
]
