#!/usr/bin/env python3
"""Writes the tokenizer parity fixtures under tests/data/tokenizer/.

Reference ids come from the library that owns each file format:
  tokenizers    for tokenizer.json (Llama 3, Llama 2, SmolLM2, the small trained fixtures)
  sentencepiece for Llama 2's tokenizer.model
  tiktoken      for Llama 3's tokenizer.model (rank file)
Chat renderings come from jinja2 with the settings transformers uses
(trim_blocks, lstrip_blocks, loopcontrols, raise_exception), then the ids from
`tokenizers` encoding the rendering without added special tokens, which is what
transformers' apply_chat_template(tokenize=True) does.

Usage: tools/make_tokenizer_fixtures.py [--shared ../shared] [--models models]
Needs: pip install tokenizers sentencepiece tiktoken jinja2
"""
import argparse
import json
import os
import random
import sys
import unicodedata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "tokenizer")

# ---------------------------------------------------------------------------- corpus

PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "Call me Ishmael. Some years ago—never mind how long precisely—having little or no money in my purse,",
    "I'm sure you'll find it's what they've wanted; we'd better go, shan't we? DON'T PANIC.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong said: \"That's one small step for [a] man.\"",
    "Streaming layers to the GPU lets a 70B model run on a card with 24 GB of memory, slowly.",
    "Mr. O'Neill's café served crème brûlée à la carte — naïve coöperation, façade, résumé.",
    "She said, 'Well... maybe?!' and left (without paying) at 5:30 p.m.",
    "Tokenizers split text into pieces; byte-level BPE never needs an unknown token.",
    "E-mail me at first.last+tag@example.co.uk or visit https://example.org/path?q=1&r=2#frag.",
]
CODE = [
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "#include <vector>\nint main() {\n\tstd::vector<int> v{1, 2, 3};\n\treturn v.size() == 3 ? 0 : 1;\n}\n",
    "{\"name\": \"layerpack\", \"version\": [0, 1, 0], \"ok\": true, \"ratio\": 3.14159}",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
    "for (size_t i = 0; i < n; ++i) { out[i] = a[i] * b[i] + c; }  // fused",
    "    if x != y:\n        raise ValueError(f\"bad {x!r}\")\n",
    "const add = (a, b) => a + b;\nconsole.log(add(2, 40));",
    "<div class=\"row\"><span id='x'>&lt;tag&gt;</span></div>",
    "$ cmake -S . -B build -G Ninja && cmake --build build -j2 2>&1 | tail",
    "fn main() -> Result<(), Box<dyn Error>> { println!(\"{:?}\", vec![1u8; 4]); Ok(()) }",
]
NUMBERS = [
    "0", "7", "42", "123", "1234", "12345", "123456789", "3.14159265358979", "-0.5e-10", "1,000,000",
    "2024-06-30T12:34:56Z", "+1 (555) 010-9999", "0xDEADBEEF", "1e100", "99.99%", "$1,299.00",
    "00000000001", "٣٤٥", "१२३४", "Ⅻ", "½ ¾ ⅞", "１２３", "3rd", "v2.0.1-rc3",
]
WHITESPACE = [
    " ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n ", "\t \t", "a  b", "a   b",
    "a\tb", "a\nb", "a \n b", "  leading", "trailing  ", "  both  ", "x\n\n\ny", " \t\n\r\x0b\x0c ", "\u00a0nbsp\u00a0",
    "ideographic\u3000space", "word   \n   word", "end with newline\n", "\n start with newline",
]
EMOJI = [
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵🇺🇸", "❤️", "👩🏾‍💻", "🧑‍🤝‍🧑", "I ❤️ NY 🗽", "🙂🙃😉", "✊🏿✊🏻", "#️⃣ 1️⃣",
    "🐈‍⬛ black cat", "family: 👨‍👨‍👧", "⭐️⭐️⭐️⭐️⭐️ 5/5",
]
SCRIPTS = [
    "你好，世界！今天天气很好。", "机器学习是人工智能的一个分支。", "日本語のテキストをトークン化します。", "ひらがなとカタカナ",
    "한국어 문장을 토큰화합니다.", "مرحبا بالعالم، كيف حالك؟", "اللغة العربية جميلة جداً", "नमस्ते दुनिया, आप कैसे हैं?",
    "हिन्दी में लिखा गया वाक्य।", "Привет, мир! Как дела?", "Γειά σου Κόσμε", "שלום עולם", "สวัสดีชาวโลก",
    "Tiếng Việt có dấu", "Ελληνικά και English μαζί", "Straße, Größe, Maß", "İstanbul ışık",
]
COMBINING = [
    "e\u0301", "n\u0303", "a\u0308o\u0308u\u0308", "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334a\u0358lgo",
    "cafe\u0301", "\u0915\u094d\u0937", "\u1100\u1161\u11a8", "A\u030a", "\u212b", "o\u0328\u0304",
    "q\u0307\u0323", "\u0041\u0301\u0302\u0303",
]
SPECIAL_TEXT = [
    "<|begin_of_text|>Hello", "Hello<|end_of_text|>", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<s>", "</s>", "<s>[INST] hi [/INST]", "<unk>", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>",
    "text <|eot_id|> more", "<|reserved_special_token_5|>", "<|not_a_token|>", "< s >", "<<SYS>>",
]
CONTRACTIONS = ["don't", "I'M", "it's", "they'VE", "we'll", "you'd", "'s", "''", "rock 'n' roll", "O'Reilly's"]


def make_corpus():
    rng = random.Random(20240601)
    corpus = []
    seen = set()

    def add(s):
        if s not in seen:
            seen.add(s)
            corpus.append(s)

    hand = PROSE + CODE + NUMBERS + WHITESPACE + EMOJI + SCRIPTS + COMBINING + SPECIAL_TEXT + CONTRACTIONS
    for s in hand:
        add(s)
        add(" " + s)
        add(s + " ")
    pools = [PROSE, CODE, NUMBERS, WHITESPACE, EMOJI, SCRIPTS, COMBINING, CONTRACTIONS]
    separators = ["", " ", "  ", "\n", "\t", ", ", "\n\n", " \n", "   "]
    while len(corpus) < 1400:
        parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 4))]
        s = parts[0]
        for p in parts[1:]:
            s += rng.choice(separators) + p
        if rng.random() < 0.2:
            s = " " * rng.randint(1, 3) + s
        if rng.random() < 0.2:
            s = s + " " * rng.randint(1, 3)
        add(s)
    # Digit runs and mixed numbers.
    while len(corpus) < 1700:
        n = rng.randint(1, 30)
        digits = "".join(rng.choice("0123456789") for _ in range(n))
        form = rng.randint(0, 4)
        if form == 0:
            add(digits)
        elif form == 1:
            add("x" + digits + "y")
        elif form == 2:
            add(digits[: n // 2] + "." + digits[n // 2:])
        elif form == 3:
            add("in " + digits + " years")
        else:
            add(" " + digits + " ")
    # Random Unicode from selected blocks, including unassigned-looking mixes.
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F64F), (0x300, 0x36F), (0x2000, 0x206F)]
    while len(corpus) < 2100:
        chars = []
        for _ in range(rng.randint(1, 25)):
            lo, hi = rng.choice(blocks)
            cp = rng.randint(lo, hi)
            if 0xD800 <= cp <= 0xDFFF:
                continue
            chars.append(chr(cp))
        add("".join(chars))
    # Whitespace runs of every kind and length.
    for n in range(1, 20):
        for ch in [" ", "\t", "\n", "\r\n", " \t"]:
            add("a" + ch * n + "b")
            add(ch * n)
    # Long texts (exercise the heap BPE path and long pre-tokens).
    add(" ".join(PROSE) * 3)
    add("a" * 300)
    add("😀" * 50)
    add("1234567890" * 20)
    add(" " * 100 + "x")
    add("".join(SCRIPTS))
    return corpus


# ---------------------------------------------------------------------------- references

def ensure_dir(path):
    os.makedirs(path, exist_ok=True)


def write_json(name, obj):
    path = os.path.join(OUT, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def hf_reference(name, tokenizer_json, corpus):
    from tokenizers import Tokenizer, __version__
    tok = Tokenizer.from_file(tokenizer_json)
    ids = [tok.encode(s, add_special_tokens=False).ids for s in corpus]
    decoded = [tok.decode(i, skip_special_tokens=False) for i in ids]
    with_special = [tok.encode(s, add_special_tokens=True).ids for s in corpus[:50]]
    write_json(f"reference_{name}.json", {"library": f"tokenizers {__version__}", "ids": ids, "decoded": decoded,
                                          "with_special": with_special})


def sentencepiece_reference(name, model_path, corpus):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model_path)
    ids = [sp.encode(s) for s in corpus]
    decoded = [sp.decode(i) for i in ids]
    write_json(f"reference_{name}.json", {"library": f"sentencepiece {spm.__version__}", "ids": ids,
                                          "decoded": decoded, "with_special": []})


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def tiktoken_reference(name, model_path, corpus):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(model_path)
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    i = 5
    while len(names) < 256:
        names.append(f"<|reserved_special_token_{i}|>")
        i += 1
    specials = {n: len(ranks) + k for k, n in enumerate(names)}
    enc = tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    ids = [enc.encode(s, allowed_special="all") for s in corpus]
    decoded = [enc.decode(i) for i in ids]
    write_json(f"reference_{name}.json", {"library": f"tiktoken {tiktoken.__version__}", "ids": ids,
                                          "decoded": decoded, "with_special": []})


def train_fixture_tokenizers(corpus):
    """Small byte-level BPE tokenizers built with `tokenizers`: GPT-2 style and Qwen2 style (NFC + Split)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, decoders, trainers, Regex, processors
    training = corpus * 2 + PROSE * 20 + CODE * 10
    qwen2_pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    made = []
    for style in ["gpt2_style", "qwen2_style"]:
        tok = Tokenizer(models.BPE())
        if style == "gpt2_style":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
            specials = ["<|endoftext|>"]
        else:
            tok.normalizer = normalizers.NFC()
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(qwen2_pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(training, trainer=trainer)
        directory = os.path.join(OUT, style)
        ensure_dir(directory)
        path = os.path.join(directory, "tokenizer.json")
        tok.save(path)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "add_bos_token": False}
        if style == "qwen2_style":
            config["chat_template"] = QWEN2_TEMPLATE
            config["eos_token"] = "<|im_end|>"
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=1)
        made.append((style, path))
    return made


# ---------------------------------------------------------------------------- chat templates

LLAMA2_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
                   "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
                   "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
                   "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                   "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
                   "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
                   "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
                   "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                   "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
                    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
                    "{% endfor %}")
ZEPHYR_TEMPLATE = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
                   "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
                   "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
                   "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
                   "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
QWEN2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "  Tell me a joke about café owners.  \n"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Good morning"},
     {"role": "assistant", "content": " Bonjour ! "}, {"role": "user", "content": "Merci 😀"}],
]


def render(template, messages, add_generation_prompt, bos, eos):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos, eos_token=eos)


def chat_fixtures(shared, models):
    from tokenizers import Tokenizer
    cases = []
    llama3_config = json.load(open(os.path.join(shared, "tokenizers", "llama3", "tokenizer_config.json")))
    llama3 = Tokenizer.from_file(os.path.join(shared, "tokenizers", "llama3", "tokenizer.json"))
    llama2 = Tokenizer.from_file(os.path.join(shared, "tokenizers", "llama2", "tokenizer.json"))
    families = [
        ("llama3", llama3_config["chat_template"], "<|begin_of_text|>", "<|eot_id|>", llama3, "llama3"),
        ("llama2", LLAMA2_TEMPLATE, "<s>", "</s>", llama2, "llama2"),
        ("mistral", MISTRAL_TEMPLATE, "<s>", "</s>", llama2, "llama2"),
        ("zephyr", ZEPHYR_TEMPLATE, "<s>", "</s>", llama2, "llama2"),
    ]
    qwen2_style = os.path.join(OUT, "qwen2_style", "tokenizer.json")
    if os.path.exists(qwen2_style):
        families.append(("chatml", QWEN2_TEMPLATE, "", "<|im_end|>", Tokenizer.from_file(qwen2_style), "qwen2_style"))
    smollm_config = os.path.join(models, "SmolLM2-135M-Instruct", "tokenizer_config.json")
    if os.path.exists(smollm_config):
        c = json.load(open(smollm_config))
        smol = Tokenizer.from_file(os.path.join(models, "SmolLM2-135M-Instruct", "tokenizer.json"))
        families.append(("chatml", c["chat_template"], c["bos_token"], c["eos_token"], smol, "smollm2"))
    for family, template, bos, eos, tok, tokenizer_name in families:
        for messages in CONVERSATIONS:
            for gen in (True, False):
                try:
                    text = render(template, messages, gen, bos, eos)
                    error = None
                except Exception as e:  # the template refuses this conversation
                    text, error = None, str(e)
                ids = tok.encode(text, add_special_tokens=False).ids if (tok and text is not None) else None
                cases.append({"family": family, "template": template, "bos_token": bos, "eos_token": eos,
                              "messages": messages, "add_generation_prompt": gen, "rendered": text,
                              "error": error, "tokenizer": tokenizer_name, "ids": ids})
    write_json("chat_templates.json", {"library": "jinja2 " + __import__("jinja2").__version__, "cases": cases})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    parser.add_argument("--models", default=os.path.join(ROOT, "models"))
    args = parser.parse_args()
    ensure_dir(OUT)
    corpus = make_corpus()
    counts = {}
    write_json("corpus.json", corpus)
    print(f"corpus: {len(corpus)} strings")
    tok_dir = os.path.join(args.shared, "tokenizers")
    hf_reference("llama3_json", os.path.join(tok_dir, "llama3", "tokenizer.json"), corpus)
    tiktoken_reference("llama3_tiktoken", os.path.join(tok_dir, "llama3", "tokenizer.model"), corpus)
    hf_reference("llama2_json", os.path.join(tok_dir, "llama2", "tokenizer.json"), corpus)
    sentencepiece_reference("llama2_sentencepiece", os.path.join(tok_dir, "llama2", "tokenizer.model"), corpus)
    smollm = os.path.join(args.models, "SmolLM2-135M-Instruct", "tokenizer.json")
    if os.path.exists(smollm):
        hf_reference("smollm2_json", smollm, corpus)
    else:
        print(f"note: {smollm} not found; SmolLM2 parity fixture not written", file=sys.stderr)
    for style, path in train_fixture_tokenizers(corpus):
        hf_reference(style, path, corpus)
    chat_fixtures(args.shared, args.models)


if __name__ == "__main__":
    main()
