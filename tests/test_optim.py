"""Per-module learning rates (`sa2va_trl.optim`): the groups a Trainer-built optimizer ends up with."""

from __future__ import annotations

import pytest
import torch

from sa2va_trl.optim import module_parameter_ids, split_param_groups


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(3, 3)
        self.text_hidden_fcs = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_split_moves_each_groups_matching_parameters_into_a_copy_with_its_own_lr():
    net = Net()
    decay = [net.body.weight, net.text_hidden_fcs[0].weight, net.text_hidden_fcs[2].weight]
    no_decay = [net.body.bias, net.text_hidden_fcs[0].bias, net.text_hidden_fcs[2].bias]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3)
    ids = module_parameter_ids(net, "text_hidden_fcs")
    assert ids == {id(p) for p in net.text_hidden_fcs.parameters()}
    assert split_param_groups(opt, ids, 5e-2, tag="fcs") == 4
    by_name = [(g.get("name"), g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    assert by_name == [(None, 1e-3, 0.1, 1), (None, 1e-3, 0.0, 1), ("fcs", 5e-2, 0.1, 2), ("fcs", 5e-2, 0.0, 2)]
    # every trainable parameter is still optimised exactly once
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in net.parameters() if p.requires_grad)


def test_module_names_match_whole_parts_under_wrappers_and_skip_frozen_parameters():
    wrapper = torch.nn.Module()
    wrapper.base_model = torch.nn.Module()
    wrapper.base_model.model = Net()
    wrapper.base_model.model.text_hidden_fcs_extra = torch.nn.Linear(2, 2)  # a prefix match must not count
    ids = module_parameter_ids(wrapper, "text_hidden_fcs")
    assert ids == {id(p) for p in wrapper.base_model.model.text_hidden_fcs.parameters()}
    assert module_parameter_ids(wrapper, "frozen") == set()


def test_the_scheduler_scales_the_new_group_like_the_others_and_lr_zero_freezes_the_rest():
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.0, weight_decay=0.0)
    split_param_groups(opt, module_parameter_ids(net, "text_hidden_fcs"), 1e-2, tag="fcs")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    body_before = net.body.weight.detach().clone()
    fcs_before = net.text_hidden_fcs[0].weight.detach().clone()
    net.text_hidden_fcs(net.body(torch.randn(4, 3))).sum().backward()
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0, 5e-3]
    assert torch.equal(net.body.weight, body_before)
    assert not torch.equal(net.text_hidden_fcs[0].weight, fcs_before)


def test_split_refuses_an_optimizer_that_has_stepped():
    net = Net()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    net.body(torch.ones(1, 3)).sum().backward()
    opt.step()
    with pytest.raises(RuntimeError, match="already stepped"):
        split_param_groups(opt, module_parameter_ids(net, "text_hidden_fcs"), 1.0, tag="fcs")
