"""The word tables the built-in corpus states facts about: units, weekday and month names, words with their
Chinese translations, antonym pairs.

Plain data: `facts` renders them into sentences. A fact must have one answer, so every column of a table is
unique (tests/data checks it).
"""

# name: (factor, wrong factor, en from abbr, en to abbr, en from singular, en from plural, en to plural, zh from, zh to)
UNITS = {
    "km_m": (1000, 100, "km", "m", "kilometer", "kilometers", "meters", "千米", "米"),
    "kg_g": (1000, 100, "kg", "g", "kilogram", "kilograms", "grams", "千克", "克"),
    "m_cm": (100, 1000, "m", "cm", "meter", "meters", "centimeters", "米", "厘米"),
    "h_min": (60, 100, "h", "min", "hour", "hours", "minutes", "小时", "分钟"),
    "min_s": (60, 100, "min", "s", "minute", "minutes", "seconds", "分钟", "秒"),
}

WEEKDAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WEEKDAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
MONTHS_EN = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
             "October", "November", "December"]
MONTHS_ZH = ["一月", "二月", "三月", "四月", "五月", "六月", "七月", "八月", "九月", "十月", "十一月", "十二月"]
MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # a common (non-leap) year

# English word, its Chinese translation: both columns unique, so every fact has one answer.
WORDS = [
    ("apple", "苹果"), ("banana", "香蕉"), ("orange", "橙子"), ("grape", "葡萄"), ("pear", "梨"),
    ("peach", "桃子"), ("watermelon", "西瓜"), ("strawberry", "草莓"), ("lemon", "柠檬"), ("rice", "米饭"),
    ("bread", "面包"), ("noodle", "面条"), ("egg", "鸡蛋"), ("milk", "牛奶"), ("water", "水"),
    ("tea", "茶"), ("coffee", "咖啡"), ("sugar", "糖"), ("salt", "盐"), ("meat", "肉"),
    ("fish", "鱼"), ("chicken", "鸡"), ("duck", "鸭子"), ("cat", "猫"), ("dog", "狗"),
    ("horse", "马"), ("cow", "奶牛"), ("sheep", "羊"), ("pig", "猪"), ("bird", "鸟"),
    ("tiger", "老虎"), ("lion", "狮子"), ("elephant", "大象"), ("monkey", "猴子"), ("rabbit", "兔子"),
    ("panda", "熊猫"), ("bear", "熊"), ("snake", "蛇"), ("mouse", "老鼠"), ("wolf", "狼"),
    ("sun", "太阳"), ("moon", "月亮"), ("star", "星星"), ("sky", "天空"), ("cloud", "云"),
    ("rain", "雨"), ("snow", "雪"), ("wind", "风"), ("river", "河"), ("mountain", "山"),
    ("sea", "海"), ("lake", "湖"), ("tree", "树"), ("flower", "花"), ("grass", "草"),
    ("forest", "森林"), ("stone", "石头"), ("fire", "火"), ("book", "书"), ("pen", "笔"),
    ("paper", "纸"), ("desk", "书桌"), ("chair", "椅子"), ("door", "门"), ("window", "窗户"),
    ("house", "房子"), ("school", "学校"), ("teacher", "老师"), ("student", "学生"), ("doctor", "医生"),
    ("friend", "朋友"), ("mother", "母亲"), ("father", "父亲"), ("brother", "兄弟"), ("sister", "姐妹"),
    ("child", "孩子"), ("city", "城市"), ("road", "路"), ("car", "汽车"), ("bus", "公共汽车"),
    ("train", "火车"), ("plane", "飞机"), ("boat", "船"), ("bicycle", "自行车"), ("computer", "电脑"),
    ("phone", "电话"), ("clock", "钟"), ("money", "钱"), ("music", "音乐"), ("picture", "图画"),
    ("hand", "手"), ("head", "头"), ("eye", "眼睛"), ("ear", "耳朵"), ("mouth", "嘴"),
    ("nose", "鼻子"), ("foot", "脚"), ("heart", "心"), ("red", "红色"), ("blue", "蓝色"),
    ("green", "绿色"), ("yellow", "黄色"), ("white", "白色"), ("black", "黑色"), ("spring", "春天"),
    ("summer", "夏天"), ("autumn", "秋天"), ("winter", "冬天"), ("morning", "早上"), ("night", "夜晚"),
    ("today", "今天"), ("tomorrow", "明天"), ("yesterday", "昨天"), ("name", "名字"), ("language", "语言"),
    ("country", "国家"), ("world", "世界"), ("family", "家庭"), ("food", "食物"), ("kitchen", "厨房"),
    ("garden", "花园"), ("shop", "商店"), ("hospital", "医院"), ("library", "图书馆"), ("park", "公园"),
    ("bridge", "桥"), ("island", "岛"), ("ocean", "海洋"), ("key", "钥匙"), ("box", "盒子"),
    ("cup", "杯子"), ("bowl", "碗"), ("spoon", "勺子"), ("shoe", "鞋"), ("hat", "帽子"),
    ("shirt", "衬衫"), ("bed", "床"), ("table", "桌子"), ("king", "国王"), ("queen", "王后"),
]

# Chinese antonym pair, English antonym pair: every word unique within its language, so "the opposite of
# X" has one answer.
ANTONYMS = [
    ("大", "小", "big", "small"), ("多", "少", "many", "few"), ("高", "低", "high", "low"),
    ("长", "短", "long", "short"), ("快", "慢", "fast", "slow"), ("上", "下", "up", "down"),
    ("左", "右", "left", "right"), ("前", "后", "front", "back"), ("冷", "热", "cold", "hot"),
    ("黑", "白", "black", "white"), ("新", "旧", "new", "old"), ("好", "坏", "good", "bad"),
    ("开", "关", "open", "close"), ("早", "晚", "early", "late"), ("远", "近", "far", "near"),
    ("轻", "重", "light", "heavy"), ("胖", "瘦", "fat", "thin"), ("深", "浅", "deep", "shallow"),
    ("买", "卖", "buy", "sell"), ("来", "去", "come", "go"), ("哭", "笑", "cry", "laugh"),
    ("真", "假", "true", "false"), ("对", "错", "correct", "wrong"), ("进", "出", "in", "out"),
    ("东", "西", "east", "west"), ("南", "北", "south", "north"), ("男", "女", "male", "female"),
    ("干", "湿", "dry", "wet"), ("强", "弱", "strong", "weak"), ("难", "易", "difficult", "easy"),
    ("美", "丑", "beautiful", "ugly"), ("甜", "苦", "sweet", "bitter"), ("宽", "窄", "wide", "narrow"),
    ("亮", "暗", "bright", "dark"), ("忙", "闲", "busy", "idle"), ("胜", "负", "win", "lose"),
    ("开始", "结束", "begin", "end"), ("增加", "减少", "increase", "decrease"),
    ("成功", "失败", "success", "failure"), ("快乐", "悲伤", "happy", "sad"),
    ("安全", "危险", "safe", "dangerous"), ("干净", "肮脏", "clean", "dirty"), ("富", "穷", "rich", "poor"),
    ("硬", "软", "hard", "soft"), ("内", "外", "inside", "outside"), ("推", "拉", "push", "pull"),
    ("爱", "恨", "love", "hate"), ("日", "夜", "day", "night"), ("睡", "醒", "sleep", "wake"),
    ("问", "答", "ask", "answer"), ("聪明", "愚蠢", "clever", "stupid"), ("古", "今", "ancient", "modern"),
]
