/*
 * qpcell-train.groovy -- export this project's annotations for qpcell and train a model.
 *
 * QuPath 0.4 to 0.6. Open a project, then Automate > Script editor, open this file and
 * press "Run" (once; not "Run for project": the script goes through the images itself).
 *
 * For every image (or the ones listed in IMAGES) it writes, beside project.qpproj:
 *   qpcell/<image name without extension>.geojson   all annotations of the image
 *                                                   (points = cells, unclassified areas =
 *                                                   annotated regions)
 *   qpcell/images.json                              image name, file, URI, QuPath entry ID
 *   qpcell/classes.json                             the project's classes and colours
 * and then runs:   qpcell train <project>/qpcell --out <MODEL>
 * Images without point annotations are skipped. Nothing in the project is changed.
 * The images are not opened: their saved annotations are used (the open image: as shown).
 * Every line qpcell prints appears in the log below; "Kill running script" stops qpcell.
 */

import java.nio.file.Paths
import java.util.concurrent.LinkedBlockingQueue
import java.util.concurrent.TimeUnit

// ---- settings ---------------------------------------------------------------------------
// The qpcell program of the Python environment qpcell is installed in, as a full path, e.g.
// "/home/me/qpcell/.venv/bin/qpcell" or "C:\\Users\\me\\qpcell\\.venv\\Scripts\\qpcell.exe"
QPCELL = "qpcell"
// Which images: [] for every image of the project, or names, e.g. ["slide 1.svs", "slide 2.svs"]
IMAGES = []
// The model folder to write: relative to the project folder, or a full path
MODEL = "qpcell-model"
// Minutes of training (qpcell train --time-budget): the learning-rate schedule, validation and
// stopping fit the time; a fast computer ends a model sooner, once the annotations are used up
// (["--max-passes", "0"] in TRAIN_OPTIONS: the time alone), and spends the time left on up to
// two more models whose maps are averaged (["--members", "1"]: one model, predicting faster).
// Not used when TRAIN_OPTIONS holds "--epochs" or "--time-budget".
TIME_BUDGET_MINUTES = 10
// More options for qpcell train, e.g. ["--device", "cuda"] or ["--recipe", "paper"]
TRAIN_OPTIONS = []
// false: only export (e.g. to train on another computer: copy the qpcell folder and images)
RUN_TRAINING = true
// -------------------------------------------------------------------------------------------

EXPORT_FOLDER = "qpcell"

def project = getProject()
if (project == null)
    throw new RuntimeException("qpcell: open a QuPath project first (File > Project > Open)")
def projectDir = project.getPath().getParent().toFile()
def exportDir = new File(projectDir, EXPORT_FOLDER)
exportDir.mkdirs()
// files of an earlier export: this export replaces them
exportDir.listFiles().findAll { it.isFile() && it.getName().toLowerCase().endsWith(".geojson") }
        .each { it.delete() }

def entries = project.getImageList()
if (IMAGES) {
    def names = entries.collect { it.getImageName() }
    def unknown = IMAGES.findAll { !(it in names) }
    if (unknown)
        throw new RuntimeException("qpcell: no image named " + unknown.join(", ") + " in this project")
    entries = entries.findAll { it.getImageName() in IMAGES }
}

def images = [:]
int nPoints = 0
def openEntry = getProjectEntry()  // the open image: its annotations as they are now, unsaved too
for (entry in entries) {
    if (Thread.currentThread().isInterrupted())
        throw new RuntimeException("qpcell: cancelled")
    def name = entry.getImageName()
    boolean open = openEntry != null && openEntry.getID() == entry.getID()
    def annotations = open ? getAnnotationObjects() : entry.readHierarchy().getAnnotationObjects()
    def points = annotations.findAll { it.getROI() != null && it.getROI().isPoint() }
    if (!points) {
        println "qpcell: " + name + ": no point annotations, skipped"
        continue
    }
    def stem = safeStem(name)
    if (images.containsKey(stem))
        stem = stem + "-" + entry.getID()
    def file = new File(exportDir, stem + ".geojson")
    exportObjectsToGeoJson(annotations, file.getPath(), "FEATURE_COLLECTION")
    def uri = firstUri(entry)
    images[stem] = [name: name, entry_id: entry.getID().toString(),
                    uri: uri == null ? null : uri.toString(), image: localPath(uri)]
    int n = points.sum { it.getROI().getNumPoints() } as int
    nPoints += n
    println "qpcell: " + name + ": " + n + " points -> " + file.getName()
}
if (!images)
    throw new RuntimeException("qpcell: no image has point annotations; nothing to train on")

def classes = project.getPathClasses().findAll { it != null && it.toString() }
        .collect { [name: it.toString(), color: it.getColor()] }
writeText(new File(exportDir, "classes.json"), jsonOf([pathClasses: classes]))
writeText(new File(exportDir, "images.json"), jsonOf([
        format: "qpcell-qupath-export", version: 1,
        project: project.getPath().toString(), images: images]))
println "qpcell: exported " + images.size() + " image(s), " + nPoints + " points to " + exportDir

if (RUN_TRAINING) {
    def modelDir = new File(MODEL).isAbsolute() ? new File(MODEL) : new File(projectDir, MODEL)
    // >>> qpcell command line (tests/test_groovy.py checks that qpcell accepts these options)
    def trainArgs = ["train", exportDir.getPath(), "--out", modelDir.getPath()] + TRAIN_OPTIONS
    if (TIME_BUDGET_MINUTES > 0 && !TRAIN_OPTIONS.any { it.toString() in ["--epochs", "--time-budget"] })
        trainArgs += ["--time-budget", TIME_BUDGET_MINUTES.toString()]
    // <<< qpcell command line
    runQpcell(trainArgs)
    println "qpcell: model written to " + modelDir
}


// ---- helpers (the same in qpcell-detect.groovy) -----------------------------------------

/** The image name without extension, safe as a file name (qpcell.io.qupath_project.image_stem). */
static String safeStem(String name) {
    String stem = name.replaceFirst("(?i)\\.ome\\.(tiff?|zarr|btf)\$", "")
    if (stem == name)
        stem = name.replaceFirst("\\.[A-Za-z0-9]{1,5}\$", "")
    stem = stem.replaceAll("[\\\\/:*?\"<>|\\x00-\\x1f]", "_").strip()
    while (stem.endsWith("."))
        stem = stem.substring(0, stem.length() - 1)
    return stem ? stem : "image"
}

/** The first image URI of a project entry (getURIs in 0.6, getServerURIs before). */
static Object firstUri(entry) {
    def uris
    try {
        uris = entry.getURIs()
    } catch (MissingMethodException ignored) {
        uris = entry.getServerURIs()
    }
    return uris ? uris.iterator().next() : null
}

/** The local file of a file: URI, or null. */
static String localPath(uri) {
    if (uri == null || !"file".equalsIgnoreCase(uri.getScheme()))
        return null
    try {
        return Paths.get(uri).toString()
    } catch (Exception ignored) {
        return null
    }
}

/** A small JSON writer (QuPath bundles no groovy-json). */
static String jsonOf(Object v) {
    if (v == null)
        return "null"
    if (v instanceof Map)
        return "{" + v.collect { k, x -> jsonOf(k.toString()) + ": " + jsonOf(x) }.join(", ") + "}"
    if (v instanceof Collection || v instanceof Object[])
        return "[" + v.collect { jsonOf(it) }.join(", ") + "]"
    if (v instanceof Boolean)
        return v.toString()
    if (v instanceof Number) {
        double d = ((Number) v).doubleValue()
        return (Double.isNaN(d) || Double.isInfinite(d)) ? "null" : v.toString()
    }
    def sb = new StringBuilder("\"")
    for (char c : v.toString().toCharArray()) {
        if (c == (char) '"' || c == (char) '\\')
            sb.append('\\').append(c)
        else if (c < (char) 0x20)
            sb.append(String.format("\\u%04x", (int) c))
        else
            sb.append(c)
    }
    return sb.append('"').toString()
}

static void writeText(File file, String text) {
    def tmp = new File(file.getParentFile(), "." + file.getName() + ".tmp")
    tmp.setText(text, "UTF-8")
    if (!tmp.renameTo(file)) {
        file.delete()
        tmp.renameTo(file)
    }
}

/** Run qpcell with these arguments, every output line to the log; cancellable. */
void runQpcell(List args) {
    List<String> command = [QPCELL.toString()] + args.collect { it.toString() }
    println "qpcell: running " + command.join(" ")
    def builder = new ProcessBuilder(command)
    builder.redirectErrorStream(true)
    def env = builder.environment()
    env.put("PYTHONUNBUFFERED", "1")
    env.put("PYTHONIOENCODING", "utf-8")
    env.put("NO_COLOR", "1")
    env.put("COLUMNS", "120")
    def process
    try {
        process = builder.start()
    } catch (IOException e) {
        throw new RuntimeException("qpcell: cannot start '" + QPCELL + "' (" + e.getMessage() +
                "); set QPCELL at the top of this script to the full path of qpcell")
    }
    def queue = new LinkedBlockingQueue<String>()
    def reader = Thread.start {
        process.getInputStream().withReader("UTF-8") { r ->
            String line
            while ((line = r.readLine()) != null)
                queue.put(line)
        }
    }
    def tail = new LinkedList<String>()
    def show = { String line ->
        println line
        tail.add(line)
        if (tail.size() > 5)
            tail.removeFirst()
    }
    try {
        while (process.isAlive() || reader.isAlive()) {
            if (Thread.currentThread().isInterrupted())
                throw new InterruptedException()
            String line = queue.poll(100, TimeUnit.MILLISECONDS)
            if (line != null)
                show(line)
        }
        reader.join()
    } catch (InterruptedException ignored) {
        process.descendants().toArray().each { it.destroyForcibly() }
        process.destroyForcibly()
        Thread.currentThread().interrupt()
        throw new RuntimeException("qpcell: cancelled; the qpcell process was stopped")
    }
    String rest
    while ((rest = queue.poll()) != null)
        show(rest)
    int code = process.waitFor()
    if (code != 0)
        throw new RuntimeException("qpcell " + args[0] + " failed (exit code " + code + "): " +
                (tail ? tail.join(" | ") : "no output"))
}
