"""The decoder under an 8-device CPU mesh (data=2, fsdp=2, tensor=2) equals the unsharded model."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zhchat.models.decoder import DecoderConfig
from zhchat.models.decoder_model import DecoderOnlyModel

# docs/architecture.md default rules.
RULES = (("batch", ("data", "fsdp")), ("activation_batch", ("data", "fsdp")), ("embed", "fsdp"),
         ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor"),
         ("activation_mlp", "tensor"), ("activation_heads", "tensor"),
         ("activation_vocab", "tensor"))
CFG = DecoderConfig(vocab_size=64, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, dtype="float32")


def _batch():
    rng = np.random.RandomState(0)
    seg = np.array([[1] * 8 + [2] * 8, [1] * 16, [1] * 11 + [0] * 5, [1] * 3 + [2] * 6 + [3] * 7])
    pos = np.concatenate([np.arange(8), np.arange(8)])[None].repeat(4, 0)
    pos[1], pos[2] = np.arange(16), np.where(seg[2] > 0, np.arange(16), 0)
    pos[3] = np.concatenate([np.arange(3), np.arange(6), np.arange(7)])
    return {"decoder_input_tokens": jnp.asarray(rng.randint(2, 64, (4, 16)), jnp.int32),
            "decoder_target_tokens": jnp.asarray(rng.randint(2, 64, (4, 16)), jnp.int32),
            "decoder_segment_ids": jnp.asarray(seg, jnp.int32),
            "decoder_positions": jnp.asarray(pos, jnp.int32),
            "decoder_loss_weights": jnp.asarray(seg > 0, jnp.float32)}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_loss_and_grads_equal_unsharded(scan_layers):
    assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
    model = DecoderOnlyModel(config=dataclasses.replace(CFG, scan_layers=scan_layers))
    batch = _batch()
    boxed = model.init_params(jax.random.PRNGKey(0), {"decoder_input_tokens": (4, 16)})
    params = nn.unbox(boxed)
    value_and_grad = jax.value_and_grad(lambda p, b: model.loss_fn(p, b, None)[0])
    loss, grads = jax.jit(value_and_grad)(params, batch)

    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        param_sharding = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
        batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
        sharded_params = jax.device_put(params, param_sharding)
        sharded_batch = jax.device_put(batch, batch_sharding)
        step = jax.jit(value_and_grad, in_shardings=(param_sharding, batch_sharding),
                       out_shardings=(NamedSharding(mesh, P()), param_sharding))
        s_loss, s_grads = step(sharded_params, sharded_batch)
        logits = jax.jit(lambda p, b: model.module.apply({"params": p}, b["decoder_input_tokens"]))(
            sharded_params, sharded_batch)

    np.testing.assert_allclose(s_loss, loss, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), s_grads, grads)
    # Parameters really are split: the MLP kernel is [embed -> fsdp, mlp -> tensor].
    wi = s_grads["layers"]["mlp"]["wi_0"]["kernel"] if scan_layers else \
        s_grads["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert wi.sharding.spec[-2:] == ("fsdp", "tensor")
    assert wi.addressable_shards[0].data.shape[-2:] == (16, 32)
    # The logits constraint (activation_batch, activation_length, activation_vocab) took effect.
    assert logits.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3)
