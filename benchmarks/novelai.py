"""NovelAI's aspect-ratio bucket manager, for benchmarking only.

Published by NovelAI (MIT licence) and reproduced in shared/seed-arb-blog.txt, whose listing lost
its operators; they are restored here as the algorithm's description requires. Unchanged otherwise
(debug printing removed). Ids are integers, sizes ``(w, h)``; ``bucket_file`` is a pickle of
``{id: (w, h)}``.
"""

# ruff: noqa
import pickle

import numpy as np


def get_prng(seed):
    return np.random.RandomState(seed)


class BucketManager:
    def __init__(
        self,
        bucket_file,
        valid_ids=None,
        max_size=(768, 512),
        divisible=64,
        step_size=8,
        min_dim=256,
        base_res=(512, 512),
        bsz=1,
        world_size=1,
        global_rank=0,
        max_ar_error=4,
        seed=42,
        dim_limit=1024,
        debug=False,
    ):
        with open(bucket_file, "rb") as fh:
            self.res_map = pickle.load(fh)
        if valid_ids is not None:
            new_res_map = {}
            valid_ids = set(valid_ids)
            for k, v in self.res_map.items():
                if k in valid_ids:
                    new_res_map[k] = v
            self.res_map = new_res_map
        self.max_size = max_size
        self.f = 8
        self.max_tokens = (max_size[0] / self.f) * (max_size[1] / self.f)
        self.div = divisible
        self.min_dim = min_dim
        self.dim_limit = dim_limit
        self.base_res = base_res
        self.bsz = bsz
        self.world_size = world_size
        self.global_rank = global_rank
        self.max_ar_error = max_ar_error
        self.prng = get_prng(seed)
        epoch_seed = self.prng.tomaxint() % (2**32 - 1)
        self.epoch_prng = get_prng(epoch_seed)
        self.epoch = None
        self.left_over = None
        self.batch_total = None
        self.batch_delivered = None
        self.debug = debug
        self.gen_buckets()
        self.assign_buckets()
        self.start_epoch()

    def gen_buckets(self):
        resolutions = []
        aspects = []
        w = self.min_dim
        while (w / self.f) * (self.min_dim / self.f) <= self.max_tokens and w <= self.dim_limit:
            h = self.min_dim
            got_base = False
            while (w / self.f) * ((h + self.div) / self.f) <= self.max_tokens and (h + self.div) <= self.dim_limit:
                if w == self.base_res[0] and h == self.base_res[1]:
                    got_base = True
                h += self.div
            if (w != self.base_res[0] or h != self.base_res[1]) and got_base:
                resolutions.append(self.base_res)
                aspects.append(1)
            resolutions.append((w, h))
            aspects.append(float(w) / float(h))
            w += self.div
        h = self.min_dim
        while (h / self.f) * (self.min_dim / self.f) <= self.max_tokens and h <= self.dim_limit:
            w = self.min_dim
            got_base = False
            while (h / self.f) * ((w + self.div) / self.f) <= self.max_tokens and (w + self.div) <= self.dim_limit:
                if w == self.base_res[0] and h == self.base_res[1]:
                    got_base = True
                w += self.div
            resolutions.append((w, h))
            aspects.append(float(w) / float(h))
            h += self.div
        res_map = {}
        for i, res in enumerate(resolutions):
            res_map[res] = aspects[i]
        self.resolutions = sorted(res_map.keys(), key=lambda x: x[0] * 4096 - x[1])
        self.aspects = np.array(list(map(lambda x: res_map[x], self.resolutions)))
        self.resolutions = np.array(self.resolutions)

    def assign_buckets(self):
        self.buckets = {}
        self.aspect_errors = []
        skipped = 0
        skip_list = []
        for post_id in self.res_map.keys():
            w, h = self.res_map[post_id]
            aspect = float(w) / float(h)
            bucket_id = np.abs(self.aspects - aspect).argmin()
            if bucket_id not in self.buckets:
                self.buckets[bucket_id] = []
            error = abs(self.aspects[bucket_id] - aspect)
            if error < self.max_ar_error:
                self.buckets[bucket_id].append(post_id)
            else:
                skipped += 1
                skip_list.append(post_id)
        for post_id in skip_list:
            del self.res_map[post_id]

    def start_epoch(self, world_size=None, global_rank=None):
        if world_size is not None:
            self.world_size = world_size
        if global_rank is not None:
            self.global_rank = global_rank
        index = np.array(sorted(list(self.res_map.keys())))
        index_len = index.shape[0]
        index = self.epoch_prng.permutation(index)
        index = index[: index_len - (index_len % (self.bsz * self.world_size))]
        index = index[self.global_rank :: self.world_size]
        self.batch_total = index.shape[0] // self.bsz
        assert index.shape[0] % self.bsz == 0
        index = set(index)
        self.epoch = {}
        self.left_over = []
        self.batch_delivered = 0
        for bucket_id in sorted(self.buckets.keys()):
            if len(self.buckets[bucket_id]) > 0:
                self.epoch[bucket_id] = np.array(
                    [post_id for post_id in self.buckets[bucket_id] if post_id in index], dtype=np.int64
                )
                self.prng.shuffle(self.epoch[bucket_id])
                self.epoch[bucket_id] = list(self.epoch[bucket_id])
                overhang = len(self.epoch[bucket_id]) % self.bsz
                if overhang != 0:
                    self.left_over.extend(self.epoch[bucket_id][:overhang])
                    self.epoch[bucket_id] = self.epoch[bucket_id][overhang:]
                if len(self.epoch[bucket_id]) == 0:
                    del self.epoch[bucket_id]

    def get_batch(self):
        if (
            self.epoch is None
            or self.left_over is None
            or (len(self.left_over) == 0 and not bool(self.epoch))
            or self.batch_total == self.batch_delivered
        ):
            self.start_epoch()
        found_batch = False
        batch_data = None
        resolution = self.base_res
        while not found_batch:
            bucket_ids = list(self.epoch.keys())
            if len(self.left_over) >= self.bsz:
                bucket_probs = [len(self.left_over)] + [len(self.epoch[bucket_id]) for bucket_id in bucket_ids]
                bucket_ids = [-1] + bucket_ids
            else:
                bucket_probs = [len(self.epoch[bucket_id]) for bucket_id in bucket_ids]
            bucket_probs = np.array(bucket_probs, dtype=np.float32)
            bucket_probs = bucket_probs / bucket_probs.sum()
            bucket_ids = np.array(bucket_ids, dtype=np.int64)
            if bool(self.epoch):
                chosen_id = int(self.prng.choice(bucket_ids, 1, p=bucket_probs)[0])
            else:
                chosen_id = -1
            if chosen_id == -1:
                self.prng.shuffle(self.left_over)
                batch_data = self.left_over[: self.bsz]
                self.left_over = self.left_over[self.bsz :]
                found_batch = True
            else:
                if len(self.epoch[chosen_id]) >= self.bsz:
                    batch_data = self.epoch[chosen_id][: self.bsz]
                    self.epoch[chosen_id] = self.epoch[chosen_id][self.bsz :]
                    resolution = tuple(self.resolutions[chosen_id])
                    found_batch = True
                    if len(self.epoch[chosen_id]) == 0:
                        del self.epoch[chosen_id]
                else:
                    self.left_over.extend(self.epoch[chosen_id])
                    del self.epoch[chosen_id]
        self.batch_delivered += 1
        return (batch_data, resolution)

    def generator(self):
        if self.batch_delivered >= self.batch_total:
            self.start_epoch()
        while self.batch_delivered < self.batch_total:
            yield self.get_batch()
