"""The tiny end-to-end runs the loop tests share: a reward with varied values and a small config."""

REWARD_MODULE = '''
def parity(prompts, completions, **columns):
    """1 for an even number of characters: varied rewards from an untrained model."""
    return [float(len(c) % 2 == 0) for c in completions]


def spread(prompts, completions, **columns):
    """One of 7 levels from the characters' codes: a tree's leaves almost never all tie, whatever they draw."""
    return [sum(map(ord, c)) % 7 / 6 for c in completions]
'''

# A one-layer demo model and tiny batches; 48 new tokens give a random model a fair chance to end.
TINY = ["run.steps=2", "run.progress=false", "run.tensorboard=false", "run.plots=false", "run.num_threads=2",
        "warm_start.steps=0", "data.train_size=32", "data.eval_size=4", "model.demo.hidden_size=32",
        "model.demo.num_layers=1", "model.demo.num_heads=2", "model.demo.intermediate_size=64",
        "rollout.prompts_per_step=2", "rollout.max_new_tokens=48", "loss.top_entropy_fraction=1.0",
        "reward.function=toy_reward:parity"]
