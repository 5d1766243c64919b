# ruff: noqa: RUF001  (text in other scripts is the point of this file)
"""Documents for the benchmarks and the engine tests, written for this project.

Several scripts and languages, so tokenisation, UTF-8 assembly and the prompt are
exercised beyond English. Each is short (a few hundred tokens at most), like the passages
Genstruct is usually given.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Document:
    title: str
    content: str


DOCUMENTS: tuple[Document, ...] = (
    Document(
        "Tidal locking",
        "A moon becomes tidally locked when the gravitational pull of its planet has slowed "
        "its rotation until one rotation takes exactly as long as one orbit. From then on the "
        "same face always points towards the planet. Earth's Moon reached this state early in "
        "its history: the bulge raised in its rock by Earth's gravity lagged behind the line "
        "between the two bodies, and the resulting torque braked its spin. The same process "
        "acts on Earth, far more slowly, lengthening the day by roughly two milliseconds per "
        "century while the Moon drifts outwards by about four centimetres a year.",
    ),
    Document(
        "Sourdough starters",
        "A sourdough starter is a culture of wild yeasts and lactic acid bacteria kept alive "
        "in a paste of flour and water. Each feeding supplies fresh starch, which the yeasts "
        "ferment into carbon dioxide and ethanol while the bacteria produce lactic and acetic "
        "acids. The acids lower the pH, which keeps spoilage organisms away and gives the bread "
        "its sour taste. A starter kept at room temperature needs feeding daily; in the "
        "refrigerator it can wait a week or more, though it becomes more acidic and slower to "
        "rise until it has been fed a few times at warmer temperatures.",
    ),
    Document(
        "Die Hanse",
        "Die Hanse war ein Zusammenschluss norddeutscher Kaufleute und später ganzer Städte, "
        "der vom 12. bis zum 17. Jahrhundert den Handel im Nord- und Ostseeraum prägte. Lübeck "
        "galt als ihr Haupt. Die Kaufleute unterhielten Niederlassungen, sogenannte Kontore, "
        "in Brügge, London, Bergen und Nowgorod. Gehandelt wurden vor allem Tuch, Salz, "
        "Hering, Getreide, Pelze und Wachs. Ihre Macht beruhte weniger auf einer festen "
        "Verfassung als auf gemeinsamen Privilegien, die sie bei Bedarf auch mit Handelssperren "
        "gegen Fürsten und Könige durchsetzte.",
    ),
    Document(
        "Le cycle de l'eau",
        "Le cycle de l'eau décrit les échanges continus d'eau entre les océans, l'atmosphère "
        "et les terres émergées. Sous l'effet du rayonnement solaire, l'eau s'évapore des mers "
        "et des lacs, et les plantes en libèrent par transpiration. En s'élevant, la vapeur se "
        "refroidit et se condense en gouttelettes qui forment les nuages. Les précipitations "
        "ramènent l'eau au sol, où elle ruisselle vers les rivières ou s'infiltre pour "
        "alimenter les nappes souterraines. Une molécule d'eau reste en moyenne neuf jours "
        "dans l'atmosphère, mais parfois des milliers d'années dans une nappe profonde.",
    ),
    Document(
        "Транссибирская магистраль",
        "Транссибирская магистраль соединяет Москву с Владивостоком и имеет длину около "
        "9300 километров. Строительство началось в 1891 году одновременно с двух концов и "
        "велось в трудных условиях: вечная мерзлота, болота и горные участки вокруг Байкала "
        "требовали новых инженерных решений. Дорога ускорила заселение Сибири и развитие "
        "торговли с Тихоокеанским регионом. Сегодня поезд проходит весь путь примерно за "
        "семь суток, пересекая восемь часовых поясов.",
    ),
    Document(
        "活字印刷术",
        "活字印刷术是北宋时期毕昇发明的一种印刷方法。他用胶泥制成单个的字，每个字一个印，"
        "用火烧硬后便成为活字。排版时，把需要的字按顺序排在铁板上，用松脂和蜡固定，印完后"
        "再加热把字取下，可以反复使用。与雕版印刷相比，活字印刷节省了大量刻版的时间和材料，"
        "特别适合印刷篇幅较长的书籍。后来又出现了木活字和金属活字，这项技术也逐渐传到了"
        "朝鲜、日本等地。",
    ),
    Document(
        "桜前線",
        "桜前線とは、日本各地の桜の開花日を結んだ線のことである。毎年三月の下旬に九州や"
        "四国から始まり、四月には関東や東北へ、五月には北海道へと北上していく。気象庁は"
        "各地の標本木を観測し、五輪以上の花が咲いた日を開花日として発表している。開花の"
        "時期は冬の寒さと春先の気温に左右されるため、年によって一週間以上ずれることもある。",
    ),
    Document(
        "الخوارزميات",
        "الخوارزمية سلسلة محددة من الخطوات لحل مسألة أو إنجاز مهمة. يعود الاسم إلى العالم "
        "محمد بن موسى الخوارزمي الذي عاش في بغداد في القرن التاسع الميلادي وكتب في الحساب "
        "والجبر. تُقاس جودة الخوارزمية بصحتها أولاً، ثم بالوقت والذاكرة اللذين تحتاجهما "
        "مع ازدياد حجم المدخلات. فخوارزمية البحث الثنائي مثلاً تجد عنصراً في قائمة مرتبة "
        "بعدد خطوات يتناسب مع لوغاريتم طول القائمة.",
    ),
    Document(
        "मानसून",
        "मानसून हवाओं की दिशा में मौसमी बदलाव है जो दक्षिण एशिया में भारी वर्षा लाता है। "
        "गर्मियों में भूमि समुद्र की तुलना में अधिक गर्म हो जाती है, जिससे ज़मीन के ऊपर कम "
        "दबाव का क्षेत्र बनता है और हिंद महासागर से नमी भरी हवाएँ अंदर की ओर बहने लगती हैं। "
        "भारत में साल भर की अधिकांश वर्षा जून से सितंबर के बीच होती है, इसलिए खेती, "
        "जलाशय और बिजली उत्पादन सभी मानसून पर निर्भर रहते हैं।",
    ),
    Document(
        "Emoji and Unicode",
        "Emoji such as 🌍, 🚲 and 🧪 are ordinary Unicode characters, most of them outside the "
        "Basic Multilingual Plane, so UTF-8 encodes each in four bytes. Many visible symbols "
        "are sequences: a skin tone modifier follows a hand 👋🏽, a zero width joiner glues "
        "people into a family 👩‍👩‍👧, and two regional indicator letters make a flag 🇧🇷. "
        "Software that splits text by bytes or by UTF-16 code units can cut such a sequence "
        "in half, which is why text should be measured in grapheme clusters when it is shown "
        "to people.",
    ),
    Document(
        "Ο Παρθενώνας",
        "Ο Παρθενώνας είναι ναός της θεάς Αθηνάς στην Ακρόπολη της Αθήνας και χτίστηκε "
        "ανάμεσα στο 447 και στο 432 π.Χ. Αρχιτέκτονες ήταν ο Ικτίνος και ο Καλλικράτης, ενώ "
        "τη γλυπτική διακόσμηση επέβλεψε ο Φειδίας. Οι κίονες έχουν ελαφριά κύρτωση και οι "
        "οριζόντιες γραμμές καμπυλώνονται ανεπαίσθητα, ώστε το κτίριο να φαίνεται απόλυτα "
        "ευθύ από απόσταση.",
    ),
    Document(
        "Garbage collection",
        "A tracing garbage collector finds the objects a program can still reach by starting "
        "from roots such as the stack and global variables and following every reference. "
        "Whatever it does not reach is garbage and its memory can be reused. Generational "
        "collectors exploit the observation that most objects die young: they scan a small "
        "nursery often and the older generations rarely. Reference counting, used by CPython, "
        "frees most objects immediately but needs a separate cycle detector for structures "
        "that point at each other.",
    ),
)
