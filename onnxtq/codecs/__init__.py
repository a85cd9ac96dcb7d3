"""The layer codecs (onnxtq.codec): rtn, crq, tq, ecsq and kq, each the algorithm of its pass."""
