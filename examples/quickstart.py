"""Local SGD with a server-side optimizer from optax-localsgd, in plain JAX.

K workers start each round from the global weights, take H SGD steps on their own data,
and the server turns their deltas (old - new) into one update of the global weights.
"""
import jax
import jax.numpy as jnp
import optax
import optax_localsgd as ol

K, H, ROUNDS, LOCAL_LR = 4, 8, 30, 0.1
key_x, key_w, key_meta = jax.random.split(jax.random.PRNGKey(0), 3)
x = jax.random.normal(key_x, (K, 64, 5))                       # each worker's data
y = x @ jax.random.normal(key_w, (5,))                         # a linear target
params = {"w": jnp.zeros(5), "b": jnp.zeros(())}

def loss(p, x, y):
  return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

def local_steps(p, x, y):                                      # H steps of SGD on one worker
  for _ in range(H):
    p = jax.tree.map(lambda w, g: w - LOCAL_LR * g, p, jax.grad(loss)(p, x, y))
  return p

servers = {
    "local SGD": ol.local_sgd(1.0),                           # plain model averaging
    "SlowMo": ol.slowmo(slow_learning_rate=1.0, momentum=0.5, local_learning_rate=LOCAL_LR),
    "LOpt-A (untrained)": ol.lopt_a(ol.init_lopt_a(key_meta)),
}
for name, server in servers.items():
  p, state = params, server.init(params)

  @jax.jit
  def round_(p, state):
    workers = jax.vmap(local_steps, in_axes=(None, 0, 0))(p, x, y)
    delta = jax.tree.map(lambda old, new: old - new.mean(0), p, workers)  # old - new
    updates, state = server.update(delta, state, p)
    return optax.apply_updates(p, updates), state

  for _ in range(ROUNDS):
    p, state = round_(p, state)
  print(f"{name:>20}: loss after {ROUNDS} rounds = {float(loss(p, x.reshape(-1, 5), y.reshape(-1))):.2e}")
