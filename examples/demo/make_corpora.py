"""Write the demo tree's corpora (examples/demo/data/<node>/{train,eval}.txt).

The text is written for this project: hand-written sentence templates per
domain, filled from hand-written word lists with a seeded RNG, so the output is
the same on every run. Each corpus has its own vocabulary and document shape
(clinical notes, radiology reports, contract clauses, ...), so a node trained on
one is measurably better on it than its parent. The generated files are
committed; re-run this script only after changing the templates:

    .venv/bin/python examples/demo/make_corpora.py
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
TRAIN_BYTES = 24_000
EVAL_BYTES = 4_000

# --------------------------------------------------------------------------- shared word lists

NAMES = [
    "Alice",
    "Ben",
    "Carla",
    "David",
    "Elena",
    "Frank",
    "Grace",
    "Hugo",
    "Irene",
    "James",
    "Kate",
    "Liam",
    "Maria",
    "Noah",
    "Olivia",
    "Peter",
    "Rosa",
    "Sam",
    "Tom",
    "Vera",
]
SURNAMES = [
    "Smith",
    "Jones",
    "Brown",
    "Taylor",
    "Wilson",
    "Evans",
    "Walker",
    "Wright",
    "Green",
    "Hall",
    "Wood",
    "Clarke",
    "Hughes",
    "Turner",
    "Price",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NOMBRES = [
    "Ana",
    "Carlos",
    "Lucía",
    "Javier",
    "Marta",
    "Pablo",
    "Sofía",
    "Diego",
    "Elena",
    "Miguel",
    "Laura",
    "Andrés",
    "Isabel",
    "Raúl",
    "Carmen",
    "Tomás",
]
APELLIDOS = [
    "García",
    "López",
    "Martínez",
    "Sánchez",
    "Pérez",
    "Gómez",
    "Ruiz",
    "Díaz",
    "Moreno",
    "Álvarez",
    "Romero",
    "Navarro",
]
DIAS = ["lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"]
MESES = [
    "enero",
    "febrero",
    "marzo",
    "abril",
    "mayo",
    "junio",
    "julio",
    "agosto",
    "septiembre",
    "octubre",
    "noviembre",
    "diciembre",
]

COMMON = {
    "name": NAMES,
    "surname": SURNAMES,
    "day": DAYS,
    "month": MONTHS,
    "nombre": NOMBRES,
    "apellido": APELLIDOS,
    "dia": DIAS,
    "mes": MESES,
    "age": [str(a) for a in range(24, 89)],
    "edad": [str(a) for a in range(24, 89)],
    "num": [str(n) for n in range(2, 13)],
    "year": [str(y) for y in range(2015, 2025)],
}

# --------------------------------------------------------------------------- corpora
# Each corpus: (opening templates, body templates, closing templates, slots). A document is one
# opening, 3-5 body sentences and one closing, separated by single spaces; documents by blank lines.

CORPORA: dict[str, tuple[list[str], list[str], list[str], dict[str, list[str]]]] = {}

CORPORA["en"] = (
    [
        "On {day} morning {name} walked to the {place} to buy {food}.",
        "Last {month} {name} and {name2} took the train to {city} for a long weekend.",
        "{name} has lived in the same {home} near the {place} for {num} years.",
        "Every {day} the neighbours meet at the {place} to talk about the week.",
        "The weather in {city} was {weather} all week, so {name} stayed close to home.",
    ],
    [
        "The {place} was busy, and the queue moved slowly past the {thing}.",
        "{name} likes to cook {food} with fresh {veg} from the market.",
        "In the afternoon they visited a small museum about the history of the {thing}.",
        "The children played in the park while their parents read the {paper}.",
        "A friendly woman at the bakery recommended the {food} with {veg}.",
        "It started to {rain} just as they reached the {place}, so they waited under the roof.",
        "{name} keeps a notebook of every book she reads, and this year the list is long.",
        "The bus to the {place} leaves every twenty minutes from the corner of the street.",
        "On the way back they stopped at a cafe and ordered two cups of {drink}.",
        "The old bridge over the river was closed for repairs until {month}.",
        "Her brother plays the {instrument} in a band that practises in the garage.",
        "They spent the evening planning a trip to the mountains for the summer holidays.",
        "The town library now opens late on {day}s, which many students appreciate.",
        "{name2} grows {veg} and herbs on the balcony of a small flat.",
        "The local football team won its match on {day}, and the whole street celebrated.",
        "A new cinema opened near the {place}, and the first film was a comedy.",
        "He forgot his umbrella at the station, but a kind stranger returned it the next day.",
        "The price of {food} at the market went up again this {month}.",
    ],
    [
        "By nine o'clock everyone was at home, tired but happy.",
        "It was a quiet, pleasant day, and {name} went to bed early.",
        "They agreed to meet again at the {place} next {day}.",
        "Next year they hope to visit {city} again, perhaps in the spring.",
    ],
    {
        "name2": NAMES,
        "place": [
            "market",
            "library",
            "station",
            "park",
            "post office",
            "harbour",
            "town square",
            "bakery",
            "swimming pool",
            "museum",
        ],
        "city": ["York", "Bristol", "Edinburgh", "Dublin", "Cardiff", "Bath", "Oxford", "Brighton"],
        "food": ["bread", "cheese", "apples", "fish", "soup", "pasta", "rice", "cake", "eggs", "pies"],
        "veg": ["tomatoes", "carrots", "onions", "beans", "potatoes", "spinach", "peppers", "peas"],
        "home": ["house", "flat", "cottage", "terrace house"],
        "weather": ["cold and windy", "warm and sunny", "grey and wet", "bright but chilly", "foggy"],
        "thing": ["clock tower", "old mill", "railway", "harbour wall", "town hall", "canal"],
        "paper": ["newspaper", "local paper", "weekend magazine"],
        "rain": ["rain", "snow", "hail", "drizzle"],
        "drink": ["tea", "coffee", "hot chocolate"],
        "instrument": ["guitar", "drums", "piano", "violin", "trumpet"],
    },
)

CORPORA["es"] = (
    [
        "El {dia} por la mañana {nombre} fue al {lugar} a comprar {comida}.",
        "En {mes} {nombre} y {nombre2} viajaron en tren a {ciudad} para pasar el fin de semana.",
        "{nombre} vive desde hace {num} años en una {casa} cerca del {lugar}.",
        "Cada {dia} los vecinos se reúnen en el {lugar} para hablar de la semana.",
        "El tiempo en {ciudad} fue {tiempo} toda la semana, así que {nombre} se quedó en casa.",
    ],
    [
        "El {lugar} estaba lleno de gente y la cola avanzaba despacio.",
        "A {nombre} le gusta cocinar {comida} con {verdura} fresca del mercado.",
        "Por la tarde visitaron un pequeño museo sobre la historia de la {cosa}.",
        "Los niños jugaban en el parque mientras sus padres leían el {periodico}.",
        "Una señora muy amable de la panadería les recomendó el pan de {comida}.",
        "Empezó a {lluvia} justo cuando llegaron al {lugar}, y esperaron bajo el tejado.",
        "{nombre} apunta en un cuaderno todos los libros que lee, y este año la lista es larga.",
        "El autobús al {lugar} sale cada veinte minutos desde la esquina de la calle.",
        "De vuelta pararon en una cafetería y pidieron dos tazas de {bebida}.",
        "El puente viejo sobre el río estuvo cerrado por obras hasta {mes}.",
        "Su hermano toca la {instrumento} en un grupo que ensaya en el garaje.",
        "Pasaron la noche preparando un viaje a la montaña para las vacaciones de verano.",
        "La biblioteca del barrio ahora abre hasta tarde los {dia}, y los estudiantes lo agradecen.",
        "{nombre2} cultiva {verdura} y hierbas en el balcón de su piso.",
        "El equipo de fútbol del pueblo ganó el partido del {dia} y toda la calle lo celebró.",
        "Abrieron un cine nuevo cerca del {lugar}, y la primera película fue una comedia.",
        "Olvidó el paraguas en la estación, pero un desconocido se lo devolvió al día siguiente.",
        "Este mes de {mes} el precio de la {comida} volvió a subir en el mercado.",
    ],
    [
        "A las nueve todos estaban en casa, cansados pero contentos.",
        "Fue un día tranquilo y agradable, y {nombre} se acostó temprano.",
        "Quedaron en verse otra vez en el {lugar} el próximo {dia}.",
        "El año que viene esperan volver a {ciudad}, quizá en primavera.",
    ],
    {
        "nombre2": NOMBRES,
        "lugar": ["mercado", "parque", "puerto", "museo", "ayuntamiento", "polideportivo", "centro", "barrio"],
        "ciudad": ["Sevilla", "Valencia", "Bilbao", "Granada", "Salamanca", "Zaragoza", "Málaga", "Toledo"],
        "comida": ["fruta", "carne", "paella", "tortilla", "sopa", "fruta seca", "verdura", "merluza"],
        "verdura": ["cebolla", "zanahoria", "lechuga", "patata", "calabaza", "espinaca", "berenjena"],
        "casa": ["casa", "casita", "vivienda", "casa antigua"],
        "tiempo": ["frío y ventoso", "cálido y soleado", "gris y lluvioso", "fresco pero despejado"],
        "cosa": ["catedral", "muralla", "estación", "plaza mayor", "fábrica de seda", "vieja mina"],
        "periodico": ["periódico", "diario local", "suplemento del domingo"],
        "lluvia": ["llover", "nevar", "granizar", "lloviznar"],
        "bebida": ["café", "té", "chocolate caliente"],
        "instrumento": ["guitarra", "batería", "trompeta", "flauta", "gaita"],
    },
)

CORPORA["en/medical"] = (
    [
        "Patient is a {age}-year-old {sex} presenting with {symptom} for {num} days.",
        "Clinic note: {age}-year-old {sex} seen for follow-up of {condition}.",
        "Emergency department assessment of a {age}-year-old {sex} with {symptom}.",
        "Discharge summary: the patient was admitted on {day} with {condition}.",
    ],
    [
        "Past medical history is significant for {condition2} and {condition3}.",
        "Current medications include {drug} {dose} daily and {drug2} as needed.",
        "Vital signs: blood pressure {bp}, heart rate {hr} beats per minute, temperature {temp} degrees.",
        "On examination the patient was alert and oriented, with {exam}.",
        "Laboratory results showed {lab}.",
        "The patient denies {neg_symptom} and {neg_symptom2}.",
        "Allergies: {allergy}.",
        "The patient was started on {drug} {dose} twice daily.",
        "Blood cultures were drawn before antibiotics were given.",
        "Renal function was checked and the dose of {drug2} was adjusted.",
        "Nursing staff reported that the patient tolerated oral fluids well.",
        "The differential diagnosis includes {condition} and {condition2}.",
        "The patient was counselled on medication adherence and warning signs.",
        "Oxygen saturation was {sat} percent on room air.",
    ],
    [
        "Plan: continue current treatment and review in {num} weeks.",
        "Follow-up with the primary care physician in {num} days.",
        "The patient was discharged home in stable condition.",
        "Return to the emergency department if symptoms worsen.",
    ],
    {
        "sex": ["man", "woman", "male", "female"],
        "symptom": [
            "fever and productive cough",
            "abdominal pain",
            "shortness of breath",
            "headache and nausea",
            "lower back pain",
            "dizziness",
            "painful urination",
            "swelling of the left leg",
        ],
        "condition": [
            "community-acquired pneumonia",
            "type 2 diabetes",
            "urinary tract infection",
            "hypertension",
            "asthma exacerbation",
            "acute kidney injury",
            "cellulitis",
            "gastroenteritis",
        ],
        "condition2": [
            "hypertension",
            "hyperlipidaemia",
            "chronic kidney disease",
            "hypothyroidism",
            "obesity",
            "osteoarthritis",
            "depression",
            "COPD",
        ],
        "condition3": ["gout", "anaemia", "migraine", "atrial fibrillation", "sleep apnoea", "GERD"],
        "drug": [
            "amoxicillin",
            "metformin",
            "lisinopril",
            "atorvastatin",
            "omeprazole",
            "prednisolone",
            "ceftriaxone",
            "levothyroxine",
        ],
        "drug2": ["paracetamol", "ibuprofen", "salbutamol", "furosemide", "sertraline", "insulin glargine"],
        "dose": ["5 mg", "10 mg", "20 mg", "40 mg", "500 mg", "850 mg", "1 g"],
        "bp": ["128/82", "142/90", "118/76", "156/94", "110/70", "135/85"],
        "hr": ["72", "88", "96", "104", "64", "110"],
        "temp": ["36.8", "37.4", "38.2", "38.9", "36.5"],
        "sat": ["94", "96", "98", "92", "99"],
        "exam": [
            "crackles at the right lung base",
            "mild tenderness in the right lower quadrant",
            "no focal neurological deficit",
            "pitting oedema of both ankles",
            "a soft, non-tender abdomen",
            "clear chest on auscultation",
        ],
        "lab": [
            "a raised white cell count and elevated C-reactive protein",
            "a haemoglobin of 10.2 g/dL",
            "HbA1c of 8.1 percent",
            "creatinine of 140 micromol per litre",
            "normal electrolytes",
            "a low serum sodium",
        ],
        "neg_symptom": ["chest pain", "vomiting", "weight loss", "night sweats", "palpitations"],
        "neg_symptom2": ["blood in the stool", "loss of consciousness", "visual disturbance", "recent travel"],
        "allergy": ["no known drug allergies", "penicillin (rash)", "sulfonamides", "codeine (nausea)"],
    },
)

CORPORA["en/legal"] = (
    [
        "Under section {sec} of the {act}, a {party} must give notice within {num} days.",
        "In {case}, the court considered whether the {party} had breached a duty of care.",
        "The claimant brought proceedings against the {party2} in the {court}.",
        "This memorandum summarises the law on {topic} as it applies to the {party}.",
    ],
    [
        "The court held that the burden of proof rests on the party making the allegation.",
        "The standard of proof in civil proceedings is the balance of probabilities.",
        "The defendant argued that the claim was time-barred under the {act}.",
        "An appeal lies to the {court2} only with permission.",
        "The judge found that the {party} had acted reasonably in the circumstances.",
        "Costs follow the event unless the court orders otherwise.",
        "The statute must be read as a whole and in light of its purpose.",
        "Evidence obtained in breach of the rules may be excluded at the discretion of the court.",
        "The {party2} was ordered to pay damages of {amount} together with interest.",
        "A fundamental principle of {topic} is that no one may profit from their own wrong.",
        "The tribunal accepted the witness statement of {name} {surname} as credible.",
        "The application for judicial review was dismissed on the ground of delay.",
        "Where the wording of the provision is ambiguous, the court may consider the legislative history.",
        "The doctrine of precedent requires lower courts to follow decisions of higher courts.",
    ],
    [
        "The appeal was dismissed and the order of the {court} was upheld.",
        "The matter was remitted to the {court} for a fresh hearing.",
        "Accordingly, the claim succeeds in part.",
        "Further advice should be sought before any proceedings are issued.",
    ],
    {
        "sec": [str(s) for s in range(3, 48)],
        "act": [
            "Limitation Act",
            "Consumer Rights Act",
            "Data Protection Act",
            "Employment Rights Act",
            "Housing Act",
            "Sale of Goods Act",
            "Companies Act",
        ],
        "party": ["landlord", "employer", "trustee", "company director", "public authority", "seller"],
        "party2": ["defendant", "respondent", "local council", "insurer", "contractor"],
        "case": ["Donoghue v Stevenson", "Caparo v Dickman", "Smith v Jones", "R v Brown", "Hadley v Baxendale"],
        "court": ["High Court", "County Court", "Employment Tribunal", "Magistrates' Court"],
        "court2": ["Court of Appeal", "Supreme Court", "Upper Tribunal"],
        "topic": ["negligence", "unfair dismissal", "consumer protection", "trusts", "tenancy law", "judicial review"],
        "amount": ["12,500 pounds", "48,000 pounds", "3,200 pounds", "150,000 pounds"],
    },
)

CORPORA["es/medical"] = (
    [
        "Paciente de {edad} años, {sexo}, que acude por {sintoma} de {num} días de evolución.",
        "Nota de consulta: {sexo} de {edad} años en seguimiento por {enfermedad}.",
        "Valoración en urgencias de {sexo} de {edad} años con {sintoma}.",
        "Informe de alta: el paciente ingresó el {dia} por {enfermedad}.",
    ],
    [
        "Antecedentes personales de {enfermedad2} y {enfermedad3}.",
        "Tratamiento habitual: {farmaco} {dosis} al día y {farmaco2} a demanda.",
        "Constantes: tensión arterial {ta}, frecuencia cardiaca {fc} latidos por minuto, temperatura {temp} grados.",
        "A la exploración, consciente y orientado, con {exploracion}.",
        "En la analítica destaca {analitica}.",
        "Niega {negativo} y {negativo2}.",
        "Alergias: {alergia}.",
        "Se inicia tratamiento con {farmaco} {dosis} cada doce horas.",
        "Se extraen hemocultivos antes de iniciar el antibiótico.",
        "Se revisa la función renal y se ajusta la dosis de {farmaco2}.",
        "Enfermería refiere buena tolerancia a la vía oral.",
        "El diagnóstico diferencial incluye {enfermedad} y {enfermedad2}.",
        "Se explican al paciente los signos de alarma y la importancia de la adherencia.",
        "Saturación de oxígeno del {sat} por ciento sin oxígeno suplementario.",
    ],
    [
        "Plan: mantener el tratamiento actual y revisión en {num} semanas.",
        "Control por su médico de atención primaria en {num} días.",
        "Se da de alta a domicilio en situación estable.",
        "Acudir de nuevo a urgencias si empeoran los síntomas.",
    ],
    {
        "sexo": ["varón", "mujer"],
        "sintoma": [
            "fiebre y tos productiva",
            "dolor abdominal",
            "disnea",
            "cefalea y náuseas",
            "dolor lumbar",
            "mareo",
            "disuria",
            "edema en la pierna izquierda",
        ],
        "enfermedad": [
            "neumonía adquirida en la comunidad",
            "diabetes tipo 2",
            "infección urinaria",
            "hipertensión arterial",
            "crisis asmática",
            "insuficiencia renal aguda",
            "celulitis",
        ],
        "enfermedad2": [
            "hipertensión arterial",
            "dislipemia",
            "enfermedad renal crónica",
            "hipotiroidismo",
            "obesidad",
            "artrosis",
            "EPOC",
        ],
        "enfermedad3": ["gota", "anemia", "migraña", "fibrilación auricular", "apnea del sueño"],
        "farmaco": [
            "amoxicilina",
            "metformina",
            "enalapril",
            "atorvastatina",
            "omeprazol",
            "prednisona",
            "ceftriaxona",
            "levotiroxina",
        ],
        "farmaco2": ["paracetamol", "ibuprofeno", "salbutamol", "furosemida", "sertralina", "metamizol"],
        "dosis": ["5 mg", "10 mg", "20 mg", "40 mg", "500 mg", "850 mg", "1 g"],
        "ta": ["128/82", "142/90", "118/76", "156/94", "110/70"],
        "fc": ["72", "88", "96", "104", "64"],
        "temp": ["36,8", "37,4", "38,2", "38,9"],
        "sat": ["94", "96", "98", "92"],
        "exploracion": [
            "crepitantes en la base pulmonar derecha",
            "dolor a la palpación en fosa iliaca derecha",
            "sin focalidad neurológica",
            "edemas con fóvea en ambos tobillos",
            "abdomen blando y depresible",
            "auscultación pulmonar normal",
        ],
        "analitica": [
            "leucocitosis con PCR elevada",
            "hemoglobina de 10,2 g/dL",
            "HbA1c del 8,1 por ciento",
            "creatinina de 1,6 mg/dL",
            "iones normales",
            "hiponatremia leve",
        ],
        "negativo": ["dolor torácico", "vómitos", "pérdida de peso", "sudoración nocturna"],
        "negativo2": ["sangre en las heces", "pérdida de conocimiento", "alteraciones visuales", "viajes recientes"],
        "alergia": ["no refiere alergias medicamentosas", "penicilina", "sulfamidas", "codeína"],
    },
)

CORPORA["en/medical/radiology"] = (
    [
        "EXAMINATION: {modality} of the {region}. INDICATION: {indication}.",
        "{modality} {region}, {contrast}. CLINICAL HISTORY: {indication}.",
        "REPORT: {modality} of the {region} performed on {day}. COMPARISON: {comparison}.",
    ],
    [
        "TECHNIQUE: axial images were acquired {contrast} with coronal and sagittal reformats.",
        "FINDINGS: there is a {lesion} measuring {size} in the {location}.",
        "No {negfinding} is identified.",
        "The {organ} is normal in size and attenuation.",
        "There is mild {degenerative} at the {level} level.",
        "No abnormality of the {organ2} is seen.",
        "A nodule measuring {size} is seen in the {lobe}, unchanged from the prior study.",
        "There is no pleural effusion or pneumothorax.",
        "Small volume lymph nodes are present, none enlarged by size criteria.",
        "The bones demonstrate no aggressive osseous lesion.",
        "Bibasal atelectasis is noted.",
        "There is a simple cyst measuring {size} in the {organ}, requiring no follow-up.",
    ],
    [
        "IMPRESSION: {impression}.",
        "IMPRESSION: {impression}. Recommend {recommendation}.",
        "IMPRESSION: no acute abnormality. {recommendation2}.",
    ],
    {
        "modality": ["CT", "MRI", "Chest X-ray", "Ultrasound", "CT angiogram", "PET-CT"],
        "region": [
            "chest",
            "abdomen and pelvis",
            "head",
            "lumbar spine",
            "cervical spine",
            "right knee",
            "pelvis",
            "neck",
        ],
        "contrast": ["with intravenous contrast", "without contrast", "with and without contrast"],
        "indication": [
            "persistent cough",
            "right upper quadrant pain",
            "trauma",
            "suspected pulmonary embolism",
            "staging",
            "back pain with radiculopathy",
            "headache",
            "weight loss",
        ],
        "comparison": ["none available", "CT of {month} {year}", "prior radiograph from {year}"],
        "size": ["4 mm", "7 mm", "1.2 cm", "2.5 cm", "8 mm", "3.1 cm"],
        "lesion": [
            "hypodense lesion",
            "ground-glass opacity",
            "enhancing mass",
            "sclerotic focus",
            "fluid collection",
            "consolidation",
        ],
        "location": [
            "right lower lobe",
            "segment VI of the liver",
            "left kidney",
            "left frontal lobe",
            "pancreatic head",
            "right adrenal gland",
        ],
        "negfinding": [
            "intracranial haemorrhage",
            "free intraperitoneal air",
            "pulmonary embolus",
            "acute fracture",
            "bowel obstruction",
            "midline shift",
        ],
        "organ": ["liver", "spleen", "pancreas", "left kidney", "thyroid"],
        "organ2": ["adrenal glands", "bladder", "aorta", "gallbladder", "mediastinum"],
        "degenerative": ["disc bulging", "facet joint arthropathy", "osteophyte formation", "disc desiccation"],
        "level": ["L4-L5", "L5-S1", "C5-C6", "C6-C7"],
        "lobe": ["right upper lobe", "left lower lobe", "right middle lobe", "lingula"],
        "impression": [
            "right lower lobe consolidation in keeping with pneumonia",
            "no pulmonary embolism",
            "indeterminate hepatic lesion",
            "degenerative change without canal stenosis",
            "small simple renal cyst",
            "stable pulmonary nodule",
        ],
        "recommendation": [
            "follow-up CT in 3 months",
            "correlation with tumour markers",
            "MRI for further characterisation",
            "clinical correlation",
        ],
        "recommendation2": ["No follow-up imaging is required", "Clinical correlation is advised"],
    },
)

CORPORA["en/medical/cardiology"] = (
    [
        "CARDIOLOGY CONSULT: {age}-year-old {sex} referred for {cindication}.",
        "ECHOCARDIOGRAM REPORT: indication {cindication}.",
        "Cardiac catheterisation note: {age}-year-old {sex} with {cindication}.",
        "Heart failure clinic review of a {age}-year-old {sex} with NYHA class {nyha} symptoms.",
    ],
    [
        "The ECG shows {ecg}.",
        "Left ventricular ejection fraction is estimated at {ef} percent.",
        "There is {valve} of the {valvename} valve.",
        "Troponin was {trop} on admission and {trop2} at three hours.",
        "Coronary angiography demonstrated a {stenosis} stenosis of the {artery}.",
        "A drug-eluting stent was deployed in the {artery} with a good angiographic result.",
        "The patient is on dual antiplatelet therapy with aspirin and {p2y12}.",
        "Beta blockade with {bb} was uptitrated to {bbdose}.",
        "Anticoagulation with {anticoag} was started for stroke prevention.",
        "NT-proBNP was {bnp} pg per mL.",
        "The right ventricle is normal in size and function.",
        "Holter monitoring recorded {holter}.",
        "The CHA2DS2-VASc score is {num}.",
        "Blood pressure in clinic was {bp} with a resting heart rate of {hr}.",
    ],
    [
        "Plan: repeat echocardiogram in {num} months and continue guideline-directed therapy.",
        "Recommend cardiac rehabilitation and review in the cardiology clinic.",
        "The patient was listed for elective coronary angiography.",
        "Continue current medication; no driving for one week after the procedure.",
    ],
    {
        "sex": ["man", "woman"],
        "cindication": [
            "chest pain on exertion",
            "palpitations",
            "new murmur",
            "syncope",
            "breathlessness",
            "suspected acute coronary syndrome",
            "atrial fibrillation",
        ],
        "nyha": ["I", "II", "III"],
        "ecg": [
            "sinus rhythm with ST depression in V4 to V6",
            "atrial fibrillation with a ventricular rate of 110",
            "left bundle branch block",
            "sinus bradycardia",
            "T wave inversion in the inferior leads",
            "first degree heart block",
        ],
        "ef": ["35", "40", "45", "55", "60", "25"],
        "valve": ["moderate regurgitation", "mild stenosis", "severe stenosis", "trivial regurgitation"],
        "valvename": ["mitral", "aortic", "tricuspid"],
        "trop": ["12 ng/L", "48 ng/L", "230 ng/L", "5 ng/L"],
        "trop2": ["15 ng/L", "310 ng/L", "1200 ng/L", "6 ng/L"],
        "stenosis": ["70 percent", "90 percent", "critical", "50 percent"],
        "artery": [
            "left anterior descending artery",
            "right coronary artery",
            "circumflex artery",
            "first diagonal branch",
        ],
        "p2y12": ["clopidogrel", "ticagrelor", "prasugrel"],
        "bb": ["bisoprolol", "metoprolol", "carvedilol"],
        "bbdose": ["2.5 mg daily", "5 mg daily", "10 mg daily", "25 mg twice daily"],
        "anticoag": ["apixaban", "rivaroxaban", "warfarin", "edoxaban"],
        "bnp": ["450", "1800", "3200", "120"],
        "holter": [
            "paroxysmal atrial fibrillation",
            "frequent ventricular ectopics",
            "no significant arrhythmia",
            "a pause of 3.2 seconds",
        ],
        "bp": ["128/82", "142/90", "118/76", "106/64"],
        "hr": ["58", "64", "72", "88"],
    },
)

CORPORA["en/medical/oncology"] = (
    [
        "ONCOLOGY CLINIC, St Mary's: {age}-year-old {sex} with {cancer}, stage {stage}.",
        "Multidisciplinary tumour board, St Mary's: case of {cancer} in a {age}-year-old {sex}.",
        "Chemotherapy day unit note: cycle {cycle} of {regimen} for {cancer}.",
    ],
    [
        "Histology confirmed {histology}.",
        "Staging CT showed {staging}.",
        "The tumour is {marker}.",
        "ECOG performance status is {ecog}.",
        "The patient received cycle {cycle} of {regimen} without dose reduction.",
        "Toxicity this cycle was limited to grade {grade} {toxicity}.",
        "Neutrophil count was {neut} on the day of treatment.",
        "Tumour markers: {tmarker} fell from {tm1} to {tm2}.",
        "Radiotherapy of {rt} Gy in {fractions} fractions was delivered to the {rtsite}.",
        "The case was discussed with the surgical team regarding {surgery}.",
        "Antiemetic cover with ondansetron and dexamethasone was prescribed.",
        "Response assessment by RECIST showed {recist}.",
        "The patient consented to enrolment in the St Mary's {trial} trial.",
        "Genetic counselling was offered because of a family history of {cancer}.",
    ],
    [
        "Plan: proceed with cycle {cycle2} in three weeks if blood counts allow.",
        "Plan: restaging scan after cycle {cycle2} and review at the St Mary's oncology clinic.",
        "Refer to palliative care for symptom control and support.",
        "Outcome of the tumour board: {outcome}.",
    ],
    {
        "sex": ["man", "woman"],
        "cancer": [
            "breast cancer",
            "non-small cell lung cancer",
            "colorectal cancer",
            "ovarian cancer",
            "prostate cancer",
            "diffuse large B-cell lymphoma",
            "pancreatic adenocarcinoma",
        ],
        "stage": ["IIA", "IIB", "IIIA", "IIIC", "IV"],
        "cycle": ["1", "2", "3", "4", "5", "6"],
        "cycle2": ["2", "3", "4", "6"],
        "regimen": [
            "FOLFOX",
            "carboplatin and paclitaxel",
            "R-CHOP",
            "docetaxel",
            "FEC-T",
            "pembrolizumab",
            "gemcitabine and nab-paclitaxel",
            "capecitabine",
        ],
        "histology": [
            "invasive ductal carcinoma, grade 3",
            "adenocarcinoma with EGFR exon 19 deletion",
            "moderately differentiated adenocarcinoma",
            "high-grade serous carcinoma",
            "acinar adenocarcinoma, Gleason 4+3",
        ],
        "staging": [
            "no distant metastases",
            "two small liver metastases",
            "mediastinal lymphadenopathy",
            "bone metastases in the thoracic spine",
            "peritoneal disease",
        ],
        "marker": [
            "oestrogen receptor positive and HER2 negative",
            "HER2 amplified",
            "PD-L1 expression of 60 percent",
            "mismatch repair deficient",
            "triple negative",
        ],
        "ecog": ["0", "1", "2"],
        "grade": ["1", "2", "3"],
        "toxicity": ["fatigue", "peripheral neuropathy", "mucositis", "nausea", "neutropenia", "diarrhoea"],
        "neut": ["1.2", "2.4", "0.9", "3.1"],
        "tmarker": ["CEA", "CA-125", "CA 19-9", "PSA"],
        "tm1": ["88", "420", "1250", "36"],
        "tm2": ["12", "65", "310", "4"],
        "rt": ["20", "30", "45", "50", "60"],
        "fractions": ["5", "10", "25", "30"],
        "rtsite": ["thoracic spine", "left breast", "mediastinum", "pelvis", "whole brain"],
        "surgery": ["interval debulking surgery", "liver resection", "lobectomy", "mastectomy"],
        "recist": ["a partial response", "stable disease", "progressive disease", "a complete response"],
        "trial": ["ADJUVANT-2", "IMMUNE-LUNG", "COLON-PREVENT", "OVARIAN-MAINT"],
        "outcome": [
            "neoadjuvant chemotherapy followed by surgery",
            "radical chemoradiotherapy",
            "best supportive care",
            "systemic therapy and restaging",
        ],
    },
)

CORPORA["en/legal/contracts"] = (
    [
        "{clause}. {heading}.",
        "Clause {clause_num} ({heading}).",
        "This {agreement} is made on {day_num} {month} {year} between {company} (the Supplier) and "
        "{company2} (the Customer).",
    ],
    [
        "{num}.1 The Supplier shall provide the Services in accordance with the Specification and Good Industry Practice.",
        "{num}.2 The Customer shall pay each undisputed invoice within {days} days of receipt.",
        "{num}.3 Either party may terminate this {agreement} by giving not less than {days} days' written notice.",
        "{num}.4 Each party shall indemnify the other against all losses arising from any breach of clause {clause_num}.",
        "{num}.5 Nothing in this {agreement} shall limit or exclude liability for death or personal injury caused by negligence.",
        "{num}.6 The aggregate liability of the Supplier shall not exceed {cap}.",
        "{num}.7 All Intellectual Property Rights in the Deliverables shall vest in the {party}.",
        "{num}.8 Each party shall keep the Confidential Information of the other party confidential.",
        "{num}.9 Neither party shall be liable for any delay caused by a Force Majeure Event.",
        "{num}.10 This {agreement} shall be governed by the laws of {law}.",
        "{num}.11 No variation of this {agreement} shall be effective unless it is in writing and signed by both parties.",
        "{num}.12 The {party} may not assign or subcontract any of its rights without prior written consent.",
        "{num}.13 Any notice shall be delivered by hand or sent by recorded delivery to the registered office.",
        "{num}.14 The Supplier shall maintain insurance cover of at least {cap} for the Term.",
        "{num}.15 Time for payment shall not be of the essence of this {agreement}.",
    ],
    [
        "IN WITNESS WHEREOF the parties have signed this {agreement} on the date first written above.",
        "Signed for and on behalf of {company} by its authorised signatory.",
        "This {agreement} constitutes the entire agreement between the parties.",
    ],
    {
        "clause": [
            "1. DEFINITIONS",
            "2. SERVICES",
            "3. CHARGES AND PAYMENT",
            "4. TERM AND TERMINATION",
            "5. LIABILITY",
            "6. CONFIDENTIALITY",
            "7. GENERAL",
        ],
        "heading": [
            "Definitions and Interpretation",
            "Supply of Services",
            "Payment",
            "Termination",
            "Limitation of Liability",
            "Confidentiality",
            "Governing Law and Jurisdiction",
        ],
        "clause_num": [str(n) for n in range(2, 19)],
        "agreement": ["Agreement", "Services Agreement", "Master Services Agreement", "Supply Agreement"],
        "day_num": [str(n) for n in range(1, 29)],
        "company": ["Northwind Ltd", "Acme Supplies plc", "Blue Harbour Logistics Ltd", "Kestrel Software Ltd"],
        "company2": ["Riverside Health Trust", "Greenfield Foods Ltd", "Oakwood Council", "Summit Retail plc"],
        "days": ["14", "30", "45", "60", "90"],
        "cap": [
            "the Charges paid in the preceding twelve months",
            "1,000,000 pounds",
            "250,000 pounds",
            "five million pounds",
        ],
        "party": ["Customer", "Supplier"],
        "law": ["England and Wales", "Scotland", "Ireland"],
    },
)


def _fill(template: str, rng: random.Random, slots: dict[str, list[str]]) -> str:
    out = template
    for _ in range(3):  # slot values may contain slots themselves (e.g. comparison dates)
        if "{" not in out:
            break
        values = {key: rng.choice(vals) for key, vals in (COMMON | slots).items()}
        out = out.format(**values)
    return out


def generate(node: str, target_bytes: int, seed: int) -> str:
    openings, bodies, closings, slots = CORPORA[node]
    rng = random.Random(zlib.crc32(node.encode()) * 1000 + seed)
    docs: list[str] = []
    size = 0
    while size < target_bytes:
        sentences = [_fill(rng.choice(openings), rng, slots)]
        sentences += [_fill(b, rng, slots) for b in rng.sample(bodies, rng.randint(3, 5))]
        sentences.append(_fill(rng.choice(closings), rng, slots))
        doc = " ".join(sentences)
        docs.append(doc)
        size += len(doc.encode()) + 2
    return "\n\n".join(docs) + "\n"


def main() -> None:
    for node in CORPORA:
        folder = DATA / node
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.txt").write_text(generate(node, TRAIN_BYTES, seed=1), encoding="utf-8")
        (folder / "eval.txt").write_text(generate(node, EVAL_BYTES, seed=2), encoding="utf-8")
        print(f"wrote {folder.relative_to(DATA.parent)}/{{train,eval}}.txt")


if __name__ == "__main__":
    main()
