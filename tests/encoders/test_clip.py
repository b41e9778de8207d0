import numpy as np

from multiretrieval.encoders import get_text_encoder
from multiretrieval.encoders.clip import ConSE, imagenet_labels


def test_imagenet_labels_come_with_torchvision():
    labels = imagenet_labels()
    assert len(labels) == 1000 and "refrigerator" in labels


def test_conse_embeds_probabilities_as_the_labels_meaning():
    conse = ConSE(get_text_encoder("minilm-l6"), top_k=5)
    labels = imagenet_labels()
    probs = np.zeros((2, 1000), np.float32)
    probs[0, labels.index("refrigerator")] = 0.9
    probs[0, labels.index("washer")] = 0.1
    probs[1, labels.index("sports car")] = 1.0
    image_side = conse.embed_image_probs(probs)
    text_side = conse.embed_texts(["a fridge", "a car"])
    assert image_side.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(image_side, axis=1), 1.0, atol=1e-5)
    sims = image_side @ text_side.T
    assert sims[0, 0] > sims[0, 1] and sims[1, 1] > sims[1, 0]
