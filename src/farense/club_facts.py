"""The club's facts (data/README.md, "Facts") as patterns: the parts a right answer states and what contradicts them.

The one place the facts are written down for scoring; farense.fact_scoring applies them, farense.eval_questions
checks that every question names known facts and parts.
"""

from __future__ import annotations

_SEASON_94_95 = r"(?<!\d)(?:19)?94\s?(?:/|-|–|—|\sa\s|\se\s)\s?(?:19)?95(?!\d)"
_SEASON_95_96 = r"(?<!\d)(?:19)?95\s?(?:/|-|–|—|\sa\s|\se\s)\s?(?:19)?96(?!\d)"
MONTHS = r"janeiro|fevereiro|mar[çc]o|abril|maio|junho|julho|agosto|setembro|outubro|novembro|dezembro"

# What a right answer states, part by part (numbers on word boundaries: "1995 o" is not "5.º").
PARTS: dict[str, str] = {
    "found.year": r"(?<!\d)1910(?!\d)",
    "found.date": r"(?<![\d.])(?:1\s?\.?\s?[ºo°]?|primeiro)\s+de\s+abril\b",
    "found.city": r"\bFaro\b",
    "club.city": r"\bFaro\b",
    "name.full": r"Sporting Clube Farense",
    "stadium.name": r"S[ãa]o\s+Lu[íi]s",
    "colours": r"pret[oa]s?\b.{0,40}\bbranc[oa]s?\b|\bbranc[oa]s?\b.{0,40}\bpret[oa]s?\b|alvinegr",
    "best.place": r"(?<![\d.,])5\s?\.?\s?[ºª°](?!\w)|(?<![\d.,])5\s?\.?\s?[ºª°o]?\s+(?:lugar|posi[çc][ãa]o|classificad)"
    r"|\bquint[oa]\b|\bquinto lugar\b",
    "best.season": _SEASON_94_95,
    "uefa.cup": r"Ta[çc]a\s+(?:da\s+)?UEFA|UEFA\s+Cup",
    "uefa.season": _SEASON_95_96,
    "uefa.first": r"primeir[ao]\s+(?:participa[çc][ãa]o|vez|presen[çc]a|experi[êe]ncia|campanha|aventura)"
    r"|estreia|estre(?:ou|ar|ando)",
    "cup.final": r"\bfinal(?:ista)?\b",
    "cup.lost": r"\bperd(?:eu|ida|ido|emos|eram)\b|finalista vencido|derrotad[oa]|\bvice\b|n[ãa]o\s+(?:a\s+)?(?:venceu|ganhou|conquistou)",
    "cup.year": r"(?<!\d)1990(?!\d)",
    "nader.name": r"\bNader\b",
    "nader.nation": r"marroquin[oa]|Marrocos",
    "nader.position": r"avan[çc]ado|ponta[- ]de[- ]lan[çc]a|atacante",
    "nader.topscorer": r"melhor\s+marcador|artilheiro|goleador|bota\s+de\s+ouro|mais\s+golos|melhor\s+atirador",
    "nader.season": _SEASON_94_95,
    "faro.region": r"Algarve|algarvi",
}

# Which parts belong to which fact (a question's `facts` must be one of these).
FACTS: dict[str, tuple[str, ...]] = {
    "found": ("found.year", "found.date", "found.city"),
    "city": ("club.city",),
    "name": ("name.full",),
    "stadium": ("stadium.name",),
    "colours": ("colours",),
    "best": ("best.place", "best.season"),
    "uefa": ("uefa.cup", "uefa.season", "uefa.first"),
    "cup": ("cup.final", "cup.lost", "cup.year"),
    "nader": ("nader.name", "nader.nation", "nader.position", "nader.topscorer", "nader.season"),
    "faro": ("faro.region",),
}

# What contradicts the facts wherever it appears in an answer (unless its own clause denies it).
CONTRADICTIONS: dict[str, str] = {
    "another stadium": r"Est[áa]dio\s+(?:d[oa]s?\s+|de\s+)?(?:Algarve|Bessa|Alvalade|Drag[ãa]o|Luz|Bonfim|Jamor|Municipal|Nacional)"
    r"|\b(?:Alvalade|Bessa|Drag[ãa]o|Bonfim|Jamor)\b",
    "another colour": r"\b(?:verdes?|azu(?:l|is)|vermelh[oa]s?|amarel[oa]s?|laranjas?|encarnad[oa]s?|rox[oa]s?|dourad[oa]s?|gren[áa])\b",
    "another city": r"\b(?:Lisboa|Porto|Braga|Coimbra|Portim[ãa]o|Olh[ãa]o|Loul[ée]|Albufeira|Tavira|Lagos|Set[úu]bal|Madeira|Alentejo)\b",
    "a title the club never won": r"campe[ãa]o|t[íi]tulo\s+nacional|(?:venceu|ganhou|conquistou)\s+o\s+campeonato",
    "another European competition": r"Liga\s+dos\s+Campe[õo]es|Champions|Liga\s+Europa|Ta[çc]a\s+das\s+Ta[çc]as|Intertoto|Conference",
    "a won Taça de Portugal": r"(?:venceu|ganhou|conquistou|venceram|ganharam|levantou|vencedor[ae]?s?)\b[^.;,]{0,25}\b(?:Ta[çc]a|final)\b",
    "another place in the league": r"(?<![\d.,])(?:[1-46-9]|1[0-8])\s?\.?\s?[ºª°]\s*(?:lugar|posi)"
    r"|\b(?:primeir|segund|terceir|quart|sext|s[ée]tim|oitav)[oa]\s+(?:lugar|posi[çc][ãa]o|classificad)",
    "another nationality for Nader": r"\b(?:brasileir|argelin|tunisin|eg[íi]pci|senegal[eê]s|nigerian|angolan|franc[eê]s"
    r"|espanhol|camaron[eê]s|ganen[sc]e|cabo-verdian)\w*",
    "another position for Nader": r"Nader[^.]{0,60}\b(?:guarda-redes|defesa|lateral|m[ée]dio)\b",
    "another founding date": rf"(?<![\d.])(?:[2-9]|[12]\d|3[01])\s?\.?\s?[ºo°]?\s+de\s+abril\b"
    rf"|(?<![\d.])\d{{1,2}}\s?\.?\s?[ºo°]?\s+de\s+(?:{MONTHS.replace('abril|', '')})\b",
}

# The years and seasons the facts mention; any other one in an answer invents a fact.
KNOWN_YEARS = frozenset({"1910", "1990", "1994", "1995", "1996", "2010"})  # 2010: the centenary of 1910
KNOWN_SEASONS = frozenset({(94, 95), (95, 96)})
