"""Word lists for the zoo's templated tasks.

Written out here rather than taken from a lexicon package so task generation
has no dependency and no version drift: the same code gives the same sentences.
Each list comes as an in-distribution part (train/validation/test) and a
held-out part used only by the distribution-shifted test split.
"""

# --- sentiment -------------------------------------------------------------
POS_ADJ = [
    "good", "great", "excellent", "wonderful", "enjoyable", "pleasant", "lovely",
    "fantastic", "brilliant", "charming", "impressive", "solid", "fun", "nice",
    "memorable", "moving", "clever", "fresh", "satisfying", "delicious",
]
NEG_ADJ = [
    "bad", "awful", "terrible", "boring", "dull", "poor", "weak", "horrible",
    "disappointing", "annoying", "bland", "mediocre", "painful", "forgettable",
    "clumsy", "tedious", "stale", "messy", "unpleasant", "lousy",
]
POS_ADJ_SHIFT = [
    "superb", "delightful", "splendid", "marvelous", "terrific", "outstanding",
    "flawless", "gorgeous", "stellar", "sublime", "exquisite", "admirable",
]
NEG_ADJ_SHIFT = [
    "dreadful", "shoddy", "abysmal", "atrocious", "dismal", "pathetic",
    "flimsy", "wretched", "lackluster", "inferior", "miserable", "appalling",
]
REVIEW_NOUNS = [
    "movie", "film", "plot", "acting", "soundtrack", "ending", "dinner", "meal",
    "service", "dessert", "restaurant", "show", "script", "cast", "soup", "pasta",
]
# The `aspects` task's vote weights: odd, so a weighted sum of three +-1 polarities is never 0.
ASPECT_WEIGHT = {
    "movie": 5, "film": 5, "plot": 5, "acting": 5,
    "soundtrack": 3, "ending": 3, "dinner": 3, "meal": 3, "service": 3,
    "dessert": 1, "restaurant": 1, "show": 1, "script": 1, "cast": 1, "soup": 1, "pasta": 1,
}
REVIEW_NOUNS_SHIFT = [
    "hotel room", "laptop", "phone", "charger", "mattress", "backpack",
    "headset", "blender", "jacket", "camera", "printer", "suitcase",
]
ADVERBS = ["really", "quite", "very", "truly", "rather", "genuinely", "pretty", "so"]

# --- topic: sports (label 0) vs science (label 1) ---------------------------
SPORT_SUBJ = [
    "the striker", "the goalkeeper", "the coach", "the sprinter", "the captain",
    "the referee", "the defender", "the pitcher", "the boxer", "the quarterback",
]
SPORT_PRED = [
    "scored in the final minute", "won the championship", "missed the penalty",
    "broke the world record", "was sent off", "signed a new contract",
    "trained before the match", "lost the title fight", "celebrated the victory",
    "injured a knee in the tournament", "led the team to the playoffs",
    "dribbled past three players",
]
SCI_SUBJ = [
    "the chemist", "the physicist", "the biologist", "the astronomer",
    "the geologist", "the lab team", "the researcher", "the engineer",
    "the mathematician", "the botanist",
]
SCI_PRED = [
    "published the experiment", "measured the reaction rate",
    "discovered a new enzyme", "observed the distant galaxy",
    "sequenced the genome", "calibrated the microscope", "tested the hypothesis",
    "analysed the rock samples", "proved the theorem", "cloned the cells",
    "recorded the particle collisions", "modelled the climate data",
]
SPORT_SUBJ_SHIFT = ["the cyclist", "the jockey", "the tennis player", "the swimmer", "the golfer", "the wrestler"]
SPORT_PRED_SHIFT = [
    "crossed the finish line first", "qualified for the olympics", "lost the final set",
    "set a personal best in the pool", "won the race by a length", "finished under par",
]
SCI_SUBJ_SHIFT = ["the virologist", "the neuroscientist", "the crystallographer", "the ecologist", "the statistician", "the oceanographer"]
SCI_PRED_SHIFT = [
    "isolated the virus", "mapped the neurons", "grew the crystals",
    "surveyed the coral reef", "fitted the regression model", "sampled the deep sea vents",
]

# Verbs for the topic task, as (active, passive): the label is the field of the
# person who acts, and the other person is from the other field, so the bag of
# words is the same for both labels and only the roles tell them apart.
ROLE_VERBS = [("praised", "was praised by"), ("interviewed", "was interviewed by"), ("thanked", "was thanked by"),
              ("criticised", "was criticised by"), ("called", "was called by"), ("hugged", "was hugged by")]
ROLE_VERBS_SHIFT = [("coached", "was coached by"), ("hired", "was hired by"), ("warned", "was warned by"), ("visited", "was visited by")]
WHEN = ["", " yesterday", " on monday", " last week", " again", " this morning", " twice", " at noon"]

# --- v2 continued pretraining: text from none of the tasks' domains ----------
V2_SUBJ = [
    "the train", "the bridge", "the river", "the village", "the storm", "the museum",
    "the harbor", "the market", "the garden", "the old road", "the ferry", "the castle",
    "the forest", "the library", "the airport", "the mountain pass",
]
V2_PRED = [
    ("was closed because of snow", "shut down due to heavy snow"),
    ("opens early on sundays", "starts its day early every sunday"),
    ("is crowded in the summer", "gets busy during the summer months"),
    ("was rebuilt after the flood", "got reconstructed once the flood passed"),
    ("is a short walk from the station", "lies a few minutes on foot from the station"),
    ("attracts many visitors", "draws a lot of tourists"),
    ("was painted last spring", "got a fresh coat of paint in the spring"),
    ("is hard to reach in winter", "becomes difficult to get to when it is cold"),
    ("has a view of the sea", "looks out over the ocean"),
    ("was quiet this morning", "had a calm start to the day"),
]
