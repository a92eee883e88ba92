"""How the demo corpus was made: made-up facts planted in real prose, one per document.

The prose is the Python language reference (`pydoc_data.topics`, which no knnmem recipe trains on);
each fact is an invented one (names, codes, places that exist nowhere else), so a question about it can
only be answered from the stored documents. The files under `demo_data/` are committed, because the
reference text differs between Python versions; `python -m knnmem.eval.demo_corpus` rewrites them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# (statement planted in a document, question, expected answer).
FACTS = [
    ("The launch code for Project Heron is 4471.", "What is the launch code for Project Heron?", "4471"),
    ("The lighthouse on Varnholm Island is kept by a man named Tobias Rell.",
     "Who keeps the lighthouse on Varnholm Island?", "Tobias Rell"),
    ("The password for the Kestrel archive is bluefinch.", "What is the password for the Kestrel archive?",
     "bluefinch"),
    ("The ship Morning Lantern departs from Pier 17.", "From which pier does the ship Morning Lantern depart?", "17"),
    ("Professor Alma Quist has a cat called Pepperoni.", "What is the name of Professor Alma Quist's cat?",
     "Pepperoni"),
    ("The village of Brindlemoor has a population of 3862 people.", "What is the population of Brindlemoor?",
     "3862"),
    ("The secret ingredient in Marta Velez's soup is smoked paprika.",
     "What is the secret ingredient in Marta Velez's soup?", "paprika"),
    ("The Orrin Telescope was built in the year 1887.", "In what year was the Orrin Telescope built?", "1887"),
    ("Captain Juno Hale commands the airship Cinder.", "Which airship does Captain Juno Hale command?", "Cinder"),
    ("The Tessaly Rowing Club meets in the old boathouse on Gorse Lane.",
     "On which lane does the Tessaly Rowing Club meet?", "Gorse"),
    ("The combination of the safe in the Halvard Bank is 29-14-07.",
     "What is the combination of the safe in the Halvard Bank?", "29-14-07"),
    ("The river that runs through the town of Elmsworth is called the Dunmere.",
     "What is the name of the river that runs through Elmsworth?", "Dunmere"),
    ("Nadia Kress won the Farrow Prize for her novel The Glass Orchard.",
     "For which novel did Nadia Kress win the Farrow Prize?", "Glass Orchard"),
    ("The Wexley Bakery sells its famous plum bread for 27 dollars a loaf.",
     "How many dollars does a loaf of plum bread cost at the Wexley Bakery?", "27"),
    ("The emergency radio frequency of the Sable Ridge station is 142.7 megahertz.",
     "What is the emergency radio frequency of the Sable Ridge station?", "142.7"),
    ("The oldest tree in Corran Park is a cedar planted by Elias Fenwick.",
     "Who planted the oldest tree in Corran Park?", "Elias Fenwick"),
    ("Agent Lena Moss uses the code name Nightjar.", "What is Agent Lena Moss's code name?", "Nightjar"),
    ("The Thornbury Museum keeps the Amber Crown in room 214.",
     "In which room does the Thornbury Museum keep the Amber Crown?", "214"),
    ("The mascot of the Pellham Rovers football team is a badger named Bramble.",
     "What is the name of the Pellham Rovers' mascot?", "Bramble"),
    ("The train from Castora to Linwick leaves at 7:45 every morning.",
     "At what time does the train from Castora to Linwick leave?", "7:45"),
    ("The Zelkova Institute was founded by Harriet Ocampo.", "Who founded the Zelkova Institute?", "Harriet Ocampo"),
    ("The favourite colour of the painter Rufus Dane is turquoise.",
     "What is the favourite colour of the painter Rufus Dane?", "turquoise"),
    ("The mountain pass between Arden and Kell is called the Wolfgate.",
     "What is the mountain pass between Arden and Kell called?", "Wolfgate"),
    ("The Brightwater dam holds 73 million cubic metres of water.",
     "How many million cubic metres of water does the Brightwater dam hold?", "73"),
    ("The chess champion of Oxley is a twelve-year-old girl named Priya Sandoval.",
     "Who is the chess champion of Oxley?", "Priya Sandoval"),
    ("The access code for the Halcyon laboratory is 61538.", "What is the access code for the Halcyon laboratory?",
     "61538"),
    ("The inventor Otto Lindqvist built his first clock out of walnut wood.",
     "Out of which wood did Otto Lindqvist build his first clock?", "walnut"),
    ("The island of Merrow is home to a rare bird called the silver tern.",
     "What rare bird lives on the island of Merrow?", "silver tern"),
    ("The Calloway Hotel has exactly 312 rooms.", "How many rooms does the Calloway Hotel have?", "312"),
    ("The spaceship Perihelion is powered by a reactor named Ember.",
     "What is the name of the reactor that powers the spaceship Perihelion?", "Ember"),
    ("Grandmother Odile hid the family recipes in a tin box in the attic.",
     "In what kind of box did Grandmother Odile hide the family recipes?", "tin"),
    ("The Fernhill choir is conducted by Samuel Achebe.", "Who conducts the Fernhill choir?", "Samuel Achebe"),
    ("The winning lottery number in Dovecote last week was 8317.",
     "What was the winning lottery number in Dovecote last week?", "8317"),
    ("The poet Iris Vance was born on Juniper Row.", "On which street was the poet Iris Vance born?", "Juniper Row"),
    ("The Gallant Fox inn is famous for a drink called the copper mule.",
     "What drink is the Gallant Fox inn famous for?", "copper mule"),
    ("The treaty of Vellmar was signed in the city of Ostrel.", "In which city was the treaty of Vellmar signed?",
     "Ostrel"),
    ("The Harlow Observatory discovered a comet named Mirabel.",
     "What is the name of the comet discovered by the Harlow Observatory?", "Mirabel"),
    ("The head gardener at Ashcombe Manor is Wendell Price.", "Who is the head gardener at Ashcombe Manor?",
     "Wendell Price"),
    ("The bell in the Kingsmere clock tower weighs 940 kilograms.",
     "How many kilograms does the bell in the Kingsmere clock tower weigh?", "940"),
    ("The codename of the Falkirk submarine project is Blue Lantern.",
     "What is the codename of the Falkirk submarine project?", "Blue Lantern"),
]
# Characters of reference text per document: about 1,700 tokens with the SmolLM2 tokenizer, so the 40
# documents hold about 68k tokens.
DOCUMENT_CHARS = 6_500
DATA = Path(__file__).parent / "demo_data"


def build(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(documents {"name", "text"}, questions {"question", "answer", "document", "fact", "depth"})."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    paragraphs = [p.strip() for name in sorted(topics) for p in topics[name].split("\n\n") if p.strip()]
    documents, questions, cursor = [], [], 0
    for number, (fact, question, answer) in enumerate(FACTS):
        body = []
        while sum(len(p) + 2 for p in body) < DOCUMENT_CHARS:
            body.append(paragraphs[cursor % len(paragraphs)])
            cursor += 1
        where = rng.randrange(1, len(body))  # between two paragraphs, never first
        body.insert(where, fact)
        name = f"reference-{number:02d}"
        documents.append({"name": name, "text": "\n\n".join(body)})
        questions.append({"question": question, "answer": answer, "document": name, "fact": fact,
                          "depth": round(where / len(body), 2)})
    return documents, questions


def write(out_dir: Path = DATA) -> None:
    documents, questions = build()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("corpus.jsonl", documents), ("questions.jsonl", questions)):
        (out_dir / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    write()
