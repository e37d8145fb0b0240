"""Draws docs/images/example.png, the picture the README's commands use (no downloads needed).

python docs/images/make_example.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

W = H = 128
img = Image.new("RGB", (W, H))
sky = ImageDraw.Draw(img)
for y in range(H):  # sky gradient
    sky.line([(0, y), (W, y)], fill=(90 + y // 2, 150 + y // 3, 235))
d = ImageDraw.Draw(img)
d.ellipse((84, 12, 116, 44), fill=(255, 214, 60))  # sun
d.polygon([(0, 96), (40, 60), (84, 96)], fill=(70, 150, 80))  # hills
d.polygon([(50, 100), (96, 58), (128, 92), (128, 100)], fill=(50, 125, 70))
d.rectangle((0, 96, W, H), fill=(60, 110, 55))  # meadow
d.rectangle((22, 78, 52, 104), fill=(235, 225, 205))  # house
d.polygon([(18, 80), (37, 62), (56, 80)], fill=(180, 50, 40))  # roof
d.rectangle((33, 90, 41, 104), fill=(110, 70, 40))  # door
img.save(Path(__file__).with_name("example.png"), optimize=True)
