"""The RNG streams of the input pipeline, in one place.

Every random choice of tf.data is a stateless op seeded by (config seed, salt, ...):
the salt keeps the streams apart, so that changing one (say, adding an edge op) never
moves another (the shuffle order). A new stream takes a new number here.
"""
SHUFFLE = 0  # the order of each epoch (`pipeline`)
AUGMENT = 1  # per-example geometric augmentation (`pipeline`, `preprocess`)
EDGE = 2  # edge-condition ops, folded into the example's seed (`augment`)
CURRICULUM = 3  # the curriculum's draws of each step (`curriculum`)
VIEW = 4  # each extra view's own seeds: the example's, XOR VIEW * (view index + 1)
