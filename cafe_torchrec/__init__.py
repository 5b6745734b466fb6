from cafe_torchrec.sketch import HotSketch
