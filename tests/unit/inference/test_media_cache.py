import io

import numpy as np
import pytest
from PIL import Image

from trimodal.inference.media_cache import MediaCache, array_size, audio_key, image_key


def _png_roundtrip(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_get_counts_hits_and_misses_and_returns_what_was_put():
    cache = MediaCache(max_bytes=1000)
    assert cache.get("a") is None
    cache.put("a", "transcript", 100)
    assert cache.get("a") == "transcript"
    assert (cache.stats.hits, cache.stats.misses, cache.stats.entries, cache.stats.size) == (1, 1, 1, 100)


def test_the_least_recently_used_entry_goes_first_and_the_bound_holds():
    cache = MediaCache(max_bytes=300)
    for key in "abc":
        cache.put(key, key.upper(), 100)
    assert cache.get("a") == "A"  # a is now the most recently used: b is the oldest
    cache.put("d", "D", 100)
    assert cache.get("b") is None
    assert [cache.get(k) for k in "acd"] == ["A", "C", "D"]
    assert cache.stats.evictions == 1 and cache.stats.size == 300 and cache.stats.entries == 3


def test_replacing_a_key_counts_its_bytes_once():
    cache = MediaCache(max_bytes=300)
    cache.put("a", 1, 200)
    cache.put("a", 2, 250)
    assert cache.get("a") == 2
    assert cache.stats.size == 250 and cache.stats.entries == 1 and cache.stats.evictions == 0


def test_a_value_larger_than_the_bound_is_not_stored_and_evicts_nothing():
    cache = MediaCache(max_bytes=100)
    cache.put("small", "s", 50)
    cache.put("huge", "h", 101)
    assert cache.get("huge") is None and cache.get("small") == "s"


def test_zero_bytes_turns_the_cache_off():
    cache = MediaCache(max_bytes=0)
    cache.put("a", "A", 1)
    assert not cache.enabled and cache.get("a") is None and cache.stats.entries == 0


def test_a_negative_bound_is_refused():
    with pytest.raises(ValueError, match="max_bytes"):
        MediaCache(max_bytes=-1)


def test_audio_keys_follow_the_samples_not_the_array_layout():
    clip = np.sin(np.linspace(0, 100, 16000)).astype(np.float32)
    assert audio_key(clip) == audio_key(clip.astype(np.float64))  # same samples after the float32 cast
    changed = clip.copy()
    changed[5000] += 1e-3
    assert audio_key(clip) != audio_key(changed)


def test_image_keys_follow_the_pixels_and_the_run():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8))
    assert image_key(image, "demo/finetune") == image_key(_png_roundtrip(image), "demo/finetune")
    assert image_key(image, "demo/finetune") != image_key(image, None)
    assert image_key(image, "a") != image_key(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "a")
    # Same bytes, another shape: 32x48 and 48x32 hold as many pixels but are different images.
    reshaped = Image.frombytes("RGB", (32, 48), image.tobytes())
    assert image_key(image, "a") != image_key(reshaped, "a")


def test_array_size_counts_the_array_bytes():
    assert array_size(np.zeros((49, 576), np.float32)) >= 49 * 576 * 4


def test_counters_report_what_a_replica_exports():
    cache = MediaCache(max_bytes=150)
    cache.put("a", "A", 100)
    cache.put("b", "B", 100)
    assert cache.get("a") is None and cache.get("b") == "B"
    assert cache.counters() == {"hits": 1, "misses": 1, "evictions": 1, "entries": 1, "bytes": 100}
